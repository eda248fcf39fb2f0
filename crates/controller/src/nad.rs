//! The NetworkAttachmentDefinition controller's decisions (pure): which namespaces get
//! our NAD, what it looks like, and when its CRD can be used.

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{ApiResource, DynamicObject, ObjectMeta};
use serde_json::json;

/// Kuma's namespace label: with any value (`enabled`, `disabled`, `true`...), the
/// namespace may hold mesh pods, and Multus needs our NAD there to chain us.
pub const SIDECAR_INJECTION_LABEL: &str = "kuma.io/sidecar-injection";
/// Marks the NADs we created: only those are ever deleted.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "kong-mesh-cni";
pub const CRD_NAME: &str = "network-attachment-definitions.k8s.cni.cncf.io";
/// Multus's Event on a pod that asks for a network its namespace has no NAD of.
pub const MULTUS_NO_NETWORK: &str = "NoNetworkFound";
/// Ours on the same pod, when the fix is to label its namespace.
pub const HINT_REASON: &str = "NamespaceNotLabelled";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Create,
    Delete,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Create => "create",
            Change::Delete => "delete",
        }
    }
}

pub fn resource() -> ApiResource {
    ApiResource {
        group: "k8s.cni.cncf.io".into(),
        version: "v1".into(),
        api_version: "k8s.cni.cncf.io/v1".into(),
        kind: "NetworkAttachmentDefinition".into(),
        plural: "network-attachment-definitions".into(),
    }
}

/// What to do in `namespace`, given whether our NAD is there. A terminating namespace
/// is left alone: nothing can be created in it, and its NADs go with it.
pub fn decide(namespace: &Namespace, ours_exists: bool) -> Option<Change> {
    let terminating = namespace.metadata.deletion_timestamp.is_some()
        || namespace.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
    if terminating {
        return None;
    }
    match (namespace.labels().contains_key(SIDECAR_INJECTION_LABEL), ours_exists) {
        (true, false) => Some(Change::Create),
        (false, true) => Some(Change::Delete),
        _ => None,
    }
}

/// Our NAD: no configuration of its own (`spec.config` empty), so Multus takes the
/// plugin's configuration file of the same name from its configuration directory.
pub fn new_nad(name: &str, namespace: &str) -> DynamicObject {
    let mut nad = DynamicObject::new(name, &resource()).within(namespace);
    nad.metadata =
        ObjectMeta { labels: Some([(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned())].into()), ..nad.metadata };
    nad.data = json!({"spec": {"config": ""}});
    nad
}

/// What to tell the user about a pod Multus could not attach (`multus_message`, the
/// message of its `NoNetworkFound` Event in `namespace`): only when the missing NAD is
/// ours and the namespace lacks the label that makes us create it. With the label the
/// NAD is on its way and the kubelet's next retry attaches the pod: nothing to say.
pub fn hint(multus_message: &str, nad_name: &str, namespace: &Namespace) -> Option<String> {
    let name = namespace.metadata.name.as_deref()?;
    // Multus v4: "cannot find a network-attachment-definition (NAME) in namespace (NS): ...".
    let ours = format!("network-attachment-definition ({nad_name}) in namespace ({name})");
    if !multus_message.contains(&ours) || namespace.labels().contains_key(SIDECAR_INJECTION_LABEL) {
        return None;
    }
    Some(format!(
        "namespace {name} has no {nad_name} NetworkAttachmentDefinition because it is not labelled \
         {SIDECAR_INJECTION_LABEL}: label it (kubectl label namespace {name} {SIDECAR_INJECTION_LABEL}=enabled) \
         and kong-mesh-cni's controller creates it; the kubelet's next retry then attaches the pod"
    ))
}

/// The CRD is served (its API answers) once it is Established.
pub fn established(crd: &CustomResourceDefinition) -> bool {
    crd.metadata.deletion_timestamp.is_none()
        && crd
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Established" && c.status == "True"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NamespaceStatus;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceDefinitionCondition, CustomResourceDefinitionStatus,
    };

    fn namespace(label: Option<&str>) -> Namespace {
        let mut ns = Namespace::default();
        if let Some(value) = label {
            ns.labels_mut().insert(SIDECAR_INJECTION_LABEL.into(), value.into());
        }
        ns
    }

    #[test]
    fn any_value_of_the_label_counts() {
        for value in ["enabled", "disabled", "true", "false", ""] {
            assert_eq!(decide(&namespace(Some(value)), false), Some(Change::Create), "{value:?}");
            assert_eq!(decide(&namespace(Some(value)), true), None);
        }
        assert_eq!(decide(&namespace(None), true), Some(Change::Delete));
        assert_eq!(decide(&namespace(None), false), None);
    }

    #[test]
    fn terminating_namespaces_are_skipped() {
        let mut ns = namespace(Some("enabled"));
        ns.status = Some(NamespaceStatus { phase: Some("Terminating".into()), ..Default::default() });
        assert_eq!(decide(&ns, false), None);
        let mut ns = namespace(None);
        ns.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(decide(&ns, true), None);
    }

    #[test]
    fn the_nad_is_labelled_ours_with_an_empty_config() {
        let nad = serde_json::to_value(new_nad("kong-mesh-cni", "shop")).unwrap();
        assert_eq!(nad["apiVersion"], "k8s.cni.cncf.io/v1");
        assert_eq!(nad["kind"], "NetworkAttachmentDefinition");
        assert_eq!(nad["metadata"]["namespace"], "shop");
        assert_eq!(nad["metadata"]["labels"][MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(nad["spec"], json!({"config": ""}));
    }

    fn named(name: &str, label: Option<&str>) -> Namespace {
        let mut ns = namespace(label);
        ns.metadata.name = Some(name.into());
        ns
    }

    /// Multus v4.2.2's message (pkg/k8sclient/k8sclient.go).
    fn multus(nad: &str, ns: &str) -> String {
        format!(
            "cannot find a network-attachment-definition ({nad}) in namespace ({ns}): \
             network-attachment-definitions.k8s.cni.cncf.io \"{nad}\" not found"
        )
    }

    #[test]
    fn a_pod_missing_our_nad_in_an_unlabelled_namespace_gets_a_hint() {
        let hint = hint(&multus("kuma-cni", "shop"), "kuma-cni", &named("shop", None)).unwrap();
        assert!(hint.contains("kubectl label namespace shop kuma.io/sidecar-injection=enabled"), "{hint}");
    }

    #[test]
    fn no_hint_for_a_labelled_namespace_or_another_network() {
        assert_eq!(hint(&multus("kuma-cni", "shop"), "kuma-cni", &named("shop", Some("enabled"))), None);
        assert_eq!(hint(&multus("macvlan", "shop"), "kuma-cni", &named("shop", None)), None);
        // Our NAD asked for in another namespace (`other/kuma-cni`): not this one's label.
        assert_eq!(hint(&multus("kuma-cni", "other"), "kuma-cni", &named("shop", None)), None);
    }

    #[test]
    fn the_crd_is_usable_once_established() {
        let mut crd = CustomResourceDefinition::default();
        assert!(!established(&crd));
        let condition = |status: &str| CustomResourceDefinitionCondition {
            type_: "Established".into(),
            status: status.into(),
            ..Default::default()
        };
        crd.status =
            Some(CustomResourceDefinitionStatus { conditions: Some(vec![condition("False")]), ..Default::default() });
        assert!(!established(&crd));
        crd.status =
            Some(CustomResourceDefinitionStatus { conditions: Some(vec![condition("True")]), ..Default::default() });
        assert!(established(&crd));
    }
}
