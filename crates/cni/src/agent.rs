//! The lookup protocol between the plugin and the node agent (the installer, which
//! watches the pods of its node): one JSON line each way over a unix socket in the run
//! dir, then the connection closes. Pure: both sides do their own I/O.
//!
//! ```text
//! -> {"v":1,"namespace":"shop","name":"web-0","uid":"8e1c..."}
//! <- {"v":1,"status":"found","pod":{"metadata":{...},"spec":{...}}}
//! <- {"v":1,"status":"found","pod":{...},"waited":true}   after waiting for its watch event
//! <- {"v":1,"status":"not-found","detail":"..."}     not in the cache within WAIT
//! <- {"v":1,"status":"not-synced","detail":"..."}    the cache cannot say (starting, API lost)
//! <- {"v":1,"status":"refused","detail":"..."}       the request is bad
//! ```
//!
//! Anything but `found` sends the plugin to the API server, as before the agent.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

pub const VERSION: u32 = 1;
/// The socket's file name in the plugin's run dir.
pub const SOCKET_NAME: &str = "agent.sock";
/// A request is two names and a UID.
pub const MAX_REQUEST: usize = 4 * 1024;
/// An answer carries the pod's annotations, which Kubernetes caps at 256 KiB in all.
pub const MAX_ANSWER: usize = 1 << 20;
/// How long the agent waits for a pod it does not have yet (the runtime may call ADD
/// just as the watch event is on its way). It waits, not the plugin, because it is the
/// one that sees the event arrive: it answers at that instant, with no polling.
pub const WAIT: Duration = Duration::from_millis(300);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("not a lookup {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("unsupported lookup protocol version {0} (this side speaks {VERSION})")]
    Version(u32),
    #[error("field {field} of the lookup {what} is invalid: {reason}")]
    Field { what: &'static str, field: &'static str, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID`, when the runtime passes it: only that pod is an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

impl Request {
    pub fn new(namespace: &str, name: &str, uid: Option<&str>) -> Request {
        Request { v: VERSION, namespace: namespace.into(), name: name.into(), uid: uid.map(str::to_owned) }
    }

    pub fn to_line(&self) -> Vec<u8> {
        line(self)
    }

    pub fn parse(bytes: &[u8]) -> Result<Request, ProtocolError> {
        const WHAT: &str = "request";
        if bytes.len() > MAX_REQUEST {
            return Err(malformed(WHAT, format!("longer than {MAX_REQUEST} bytes")));
        }
        let request: Request = serde_json::from_slice(bytes).map_err(|e| malformed(WHAT, e.to_string()))?;
        if request.v != VERSION {
            return Err(ProtocolError::Version(request.v));
        }
        let field = |field, reason: &str| ProtocolError::Field { what: WHAT, field, reason: reason.into() };
        // Object names are at most 253 bytes; UIDs are 36.
        for (name, value, max) in [("namespace", &request.namespace, 63), ("name", &request.name, 253)] {
            if value.is_empty() || value.len() > max {
                return Err(field(name, &format!("must be 1 to {max} bytes")));
            }
        }
        if request.uid.as_ref().is_some_and(|u| u.is_empty() || u.len() > 128) {
            return Err(field("uid", "must be 1 to 128 bytes when given"));
        }
        Ok(request)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Found,
    NotFound,
    NotSynced,
    Refused,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub v: u32,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<Box<Pod>>,
    /// Why the answer is not `found`, for the plugin's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The agent waited for the pod's watch event (it was not in the cache when asked).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub waited: bool,
}

impl Answer {
    pub fn found(pod: Pod) -> Answer {
        Answer { v: VERSION, status: Status::Found, pod: Some(Box::new(pod)), detail: None, waited: false }
    }

    pub fn not(status: Status, detail: impl Into<String>) -> Answer {
        Answer { v: VERSION, status, pod: None, detail: Some(detail.into()), waited: false }
    }

    pub fn to_line(&self) -> Vec<u8> {
        line(self)
    }

    /// The answer to `request`: a `found` whose pod is not the one asked for (another
    /// name, or another UID than the runtime gave) is an error, not a pod.
    pub fn parse(bytes: &[u8], request: &Request) -> Result<Answer, ProtocolError> {
        const WHAT: &str = "answer";
        if bytes.len() > MAX_ANSWER {
            return Err(malformed(WHAT, format!("longer than {MAX_ANSWER} bytes")));
        }
        let answer: Answer = serde_json::from_slice(bytes).map_err(|e| malformed(WHAT, e.to_string()))?;
        if answer.v != VERSION {
            return Err(ProtocolError::Version(answer.v));
        }
        if answer.status != Status::Found {
            return Ok(answer);
        }
        let field = |field, reason: String| ProtocolError::Field { what: WHAT, field, reason };
        let meta = &answer.pod.as_ref().ok_or_else(|| field("pod", "missing from a found answer".into()))?.metadata;
        let asked = [
            ("pod.metadata.namespace", Some(&request.namespace), &meta.namespace),
            ("pod.metadata.name", Some(&request.name), &meta.name),
            ("pod.metadata.uid", request.uid.as_ref(), &meta.uid),
        ];
        for (name, wanted, got) in asked {
            if let Some(wanted) = wanted
                && got.as_ref() != Some(wanted)
            {
                return Err(field(name, format!("{got:?}, but {wanted:?} was asked for")));
            }
        }
        Ok(answer)
    }
}

fn malformed(what: &'static str, reason: String) -> ProtocolError {
    ProtocolError::Malformed { what, reason }
}

fn line(value: &impl Serialize) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(value).expect("strings and a pod serialize");
    bytes.push(b'\n');
    bytes
}

/// What the agent keeps of a pod, and sends: its identity, and the fields the pod
/// decision ([`kuma::pod::decide`]) and the plugin read (annotations, container names,
/// init containers' restart policy). No managedFields, status or images, so a node's
/// cache stays small.
pub fn decision_view(pod: &Pod) -> Pod {
    let m = &pod.metadata;
    let names = |containers: &[Container], keep_policy: bool| -> Vec<Container> {
        containers
            .iter()
            .map(|c| Container {
                name: c.name.clone(),
                restart_policy: c.restart_policy.clone().filter(|_| keep_policy),
                ..Container::default()
            })
            .collect()
    };
    Pod {
        metadata: ObjectMeta {
            namespace: m.namespace.clone(),
            name: m.name.clone(),
            uid: m.uid.clone(),
            annotations: m.annotations.clone(),
            ..ObjectMeta::default()
        },
        spec: pod.spec.as_ref().map(|s| PodSpec {
            containers: names(&s.containers, false),
            init_containers: s.init_containers.as_deref().map(|c| names(c, true)),
            ..PodSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, uid: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "name": name, "uid": uid,
                "annotations": {"kuma.io/sidecar-injected": "true"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
                "labels": {"app": "web"}},
            "spec": {
                "containers": [{"name": "app", "image": "nginx", "ports": [{"containerPort": 80}]}],
                "initContainers": [
                    {"name": "kuma-sidecar", "image": "kuma-dp", "restartPolicy": "Always"},
                    {"name": "kuma-validation", "image": "kuma-dp"}
                ],
                "nodeName": "node-1"
            },
            "status": {"phase": "Pending"}
        }))
        .unwrap()
    }

    #[test]
    fn requests_round_trip_and_bad_ones_name_the_field() {
        let request = Request::new("shop", "web-0", Some("u-1"));
        let line = request.to_line();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(Request::parse(&line).unwrap(), request);
        assert_eq!(
            String::from_utf8(Request::new("shop", "web-0", None).to_line()).unwrap(),
            "{\"v\":1,\"namespace\":\"shop\",\"name\":\"web-0\"}\n"
        );
        let bad = |text: &str| Request::parse(text.as_bytes()).unwrap_err().to_string();
        assert!(bad(r#"{"v":1,"namespace":"","name":"web"}"#).contains("field namespace"));
        assert!(bad(&format!(r#"{{"v":1,"namespace":"a","name":"{}"}}"#, "x".repeat(254))).contains("field name"));
        assert!(bad(r#"{"v":1,"namespace":"a","name":"b","uid":""}"#).contains("field uid"));
        assert!(bad(r#"{"v":2,"namespace":"a","name":"b"}"#).contains("version 2"));
        assert!(bad(r#"{"v":1,"namespace":"a"}"#).contains("not a lookup request"));
        assert!(bad("\u{0}\u{1}garbage").contains("not a lookup request"));
        assert!(bad(&" ".repeat(MAX_REQUEST + 1)).contains("longer than"));
    }

    #[test]
    fn a_found_answer_must_be_the_pod_asked_for() {
        let request = Request::new("shop", "web-0", Some("u-1"));
        let ok = Answer::found(decision_view(&pod("shop", "web-0", "u-1")));
        assert_eq!(Answer::parse(&ok.to_line(), &request).unwrap(), ok);
        // Without a UID in the request, any UID of that name will do.
        Answer::parse(&ok.to_line(), &Request::new("shop", "web-0", None)).unwrap();
        let wrong = |p: Pod| Answer::parse(&Answer::found(p).to_line(), &request).unwrap_err().to_string();
        assert!(wrong(pod("shop", "web-0", "u-2")).contains("pod.metadata.uid"));
        assert!(wrong(pod("shop", "web-1", "u-1")).contains("pod.metadata.name"));
        assert!(wrong(pod("other", "web-0", "u-1")).contains("pod.metadata.namespace"));
        let no_pod = br#"{"v":1,"status":"found"}"#;
        assert!(Answer::parse(no_pod, &request).unwrap_err().to_string().contains("field pod"));
        let miss = Answer::not(Status::NotSynced, "starting");
        assert_eq!(Answer::parse(&miss.to_line(), &request).unwrap(), miss);
        assert!(matches!(Answer::parse(br#"{"v":9,"status":"found"}"#, &request), Err(ProtocolError::Version(9))));
        assert!(Answer::parse(br#"{"v":1,"status":"maybe"}"#, &request).is_err());
    }

    #[test]
    fn the_view_decides_like_the_pod_and_drops_the_rest() {
        let full = pod("shop", "web-0", "u-1");
        let view = decision_view(&full);
        assert_eq!(kuma::pod::decide(&view).unwrap(), kuma::pod::decide(&full).unwrap());
        assert!(matches!(kuma::pod::decide(&view).unwrap(), kuma::pod::Decision::Intercept(_)));
        let text = serde_json::to_string(&view).unwrap();
        for gone in ["managedFields", "nginx", "containerPort", "nodeName", "Pending", "labels"] {
            assert!(!text.contains(gone), "{gone} kept: {text}");
        }
        assert_eq!(view.metadata.annotations, full.metadata.annotations);
        assert_eq!(view.spec.unwrap().init_containers.unwrap()[0].restart_policy.as_deref(), Some("Always"));
    }

    #[test]
    fn pods_as_kong_mesh_injects_them_decide_the_same_from_the_view() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testenv/kuma-reference/injected");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let full: Pod = serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let view = decision_view(&full);
            assert_eq!(kuma::pod::decide(&view).unwrap(), kuma::pod::decide(&full).unwrap(), "{}", path.display());
            seen += 1;
        }
        assert!(seen >= 2, "the injected pods are in {dir}");
    }
}
