//! Whether a pod's traffic is ours to redirect, decided from the pod object alone.

use std::fmt;

use crate::{Config, ConfigError};
use k8s_openapi::api::core::v1::Pod;

pub const SIDECAR_CONTAINER: &str = "kuma-sidecar";
pub const INIT_CONTAINER: &str = "kuma-init";
pub const SIDECAR_INJECTED: &str = "kuma.io/sidecar-injected";
/// The init container that runs `kong-mesh-cni validate` in mesh pods.
pub const VALIDATION_CONTAINER: &str = "kuma-validation";
/// The validator's exit code when the pod's traffic is not redirected: the contract
/// between the validator and the repair controller (any other failure exits 1).
pub const VALIDATOR_EXIT_NOT_REDIRECTED: i32 = 97;
/// Set on a pod by the node agent when it programmed the redirect in place (RFC 3339
/// time): the validator's failures up to then are repaired, and it passes on its next run.
pub const REDIRECT_REPAIRED_AT: &str = "kong-mesh-cni/redirect-repaired-at";

/// Why a pod is left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassReason {
    /// The runtime gave no pod name or namespace (not a Kubernetes pod).
    NoPodIdentity,
    ExcludedNamespace(String),
    /// `kuma-init` programs the redirect itself.
    HasKumaInit,
    NoSidecar,
    NotInjected(Option<String>),
}

impl fmt::Display for PassReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PassReason::NoPodIdentity => write!(f, "no pod name or namespace in CNI_ARGS"),
            PassReason::ExcludedNamespace(ns) => write!(f, "namespace {ns} is excluded"),
            PassReason::HasKumaInit => write!(f, "the pod has the {INIT_CONTAINER} init container"),
            PassReason::NoSidecar => write!(f, "the pod has no {SIDECAR_CONTAINER} container"),
            PassReason::NotInjected(None) => write!(f, "annotation {SIDECAR_INJECTED} is absent"),
            PassReason::NotInjected(Some(v)) => write!(f, "annotation {SIDECAR_INJECTED} is {v:?}, not \"true\""),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Intercept(Box<Config>),
    PassThrough(PassReason),
}

/// A DNS-1123 label: what a namespace name is.
pub fn dns1123_label(s: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    s.len() <= 63
        && edge(s.chars().next())
        && edge(s.chars().last())
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A DNS-1123 subdomain: what a pod name is.
pub fn dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns1123_label)
}

/// The checks that need no pod object (so no API call): identity and excluded namespaces.
pub fn pre_lookup(namespace: &str, name: &str, excluded_namespaces: &[String]) -> Option<PassReason> {
    if namespace.is_empty() || name.is_empty() {
        return Some(PassReason::NoPodIdentity);
    }
    excluded_namespaces.iter().any(|ns| ns == namespace).then(|| PassReason::ExcludedNamespace(namespace.to_owned()))
}

/// The decision for a pod object. An injected mesh pod with an invalid annotation is an
/// error: it must not start without its redirect, nor with a guessed one.
pub fn decide(pod: &Pod) -> Result<Decision, ConfigError> {
    let spec = pod.spec.as_ref();
    let init = spec.and_then(|s| s.init_containers.as_deref()).unwrap_or_default();
    if init.iter().any(|c| c.name == INIT_CONTAINER) {
        return Ok(Decision::PassThrough(PassReason::HasKumaInit));
    }
    let in_containers = spec.is_some_and(|s| s.containers.iter().any(|c| c.name == SIDECAR_CONTAINER));
    // A native sidecar is an init container that keeps running.
    let native = init.iter().any(|c| c.name == SIDECAR_CONTAINER && c.restart_policy.as_deref() == Some("Always"));
    if !in_containers && !native {
        return Ok(Decision::PassThrough(PassReason::NoSidecar));
    }
    let empty = Default::default();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    match annotations.get(SIDECAR_INJECTED).map(String::as_str) {
        Some("true") => {}
        other => return Ok(Decision::PassThrough(PassReason::NotInjected(other.map(str::to_owned)))),
    }
    Ok(Decision::Intercept(Box::new(crate::from_annotations(annotations)?)))
}
