use k8s_openapi::api::core::v1::Pod;
use kuma::pod::{Decision, PassReason, decide, pre_lookup};

fn pod(yaml: &str) -> Pod {
    serde_norway::from_str(yaml).unwrap()
}

const MESH: &str = r#"
metadata:
  name: web
  namespace: shop
  annotations: {kuma.io/sidecar-injected: "true"}
spec:
  containers: [{name: app}, {name: kuma-sidecar}]
"#;

#[test]
fn an_injected_mesh_pod_is_intercepted() {
    match decide(&pod(MESH)).unwrap() {
        Decision::Intercept(cfg) => assert_eq!(cfg.inbound.exclude_ports, vec![9901, 9001]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn native_sidecar_counts_as_the_sidecar() {
    let p = pod(r#"
metadata: {annotations: {kuma.io/sidecar-injected: "true"}}
spec:
  initContainers: [{name: kuma-sidecar, restartPolicy: Always}]
  containers: [{name: app}]
"#);
    assert!(matches!(decide(&p).unwrap(), Decision::Intercept(_)));
    // A plain init container of that name is not a sidecar.
    let p = pod(r#"
metadata: {annotations: {kuma.io/sidecar-injected: "true"}}
spec:
  initContainers: [{name: kuma-sidecar}]
  containers: [{name: app}]
"#);
    assert_eq!(decide(&p).unwrap(), Decision::PassThrough(PassReason::NoSidecar));
}

#[test]
fn pass_through_reasons() {
    let with_init = MESH.replace("spec:\n", "spec:\n  initContainers: [{name: kuma-init}]\n");
    assert_eq!(decide(&pod(&with_init)).unwrap(), Decision::PassThrough(PassReason::HasKumaInit));
    let no_sidecar = MESH.replace("{name: kuma-sidecar}", "{name: other}");
    assert_eq!(decide(&pod(&no_sidecar)).unwrap(), Decision::PassThrough(PassReason::NoSidecar));
    let not_injected = MESH.replace("\"true\"", "\"false\"");
    assert_eq!(
        decide(&pod(&not_injected)).unwrap(),
        Decision::PassThrough(PassReason::NotInjected(Some("false".into())))
    );
    let unannotated = MESH.replace("  annotations: {kuma.io/sidecar-injected: \"true\"}\n", "");
    assert_eq!(decide(&pod(&unannotated)).unwrap(), Decision::PassThrough(PassReason::NotInjected(None)));
    assert_eq!(decide(&Pod::default()).unwrap(), Decision::PassThrough(PassReason::NoSidecar));

    let excluded = vec!["kube-system".to_string()];
    assert_eq!(pre_lookup("kube-system", "dns", &excluded), Some(PassReason::ExcludedNamespace("kube-system".into())));
    assert_eq!(pre_lookup("", "dns", &excluded), Some(PassReason::NoPodIdentity));
    assert_eq!(pre_lookup("shop", "", &excluded), Some(PassReason::NoPodIdentity));
    assert_eq!(pre_lookup("shop", "web", &excluded), None);
}

#[test]
fn an_invalid_annotation_fails_the_mesh_pod_only() {
    let bad = MESH.replace(
        "{kuma.io/sidecar-injected: \"true\"}",
        "{kuma.io/sidecar-injected: \"true\", traffic.kuma.io/exclude-inbound-ports: \"80,abc\"}",
    );
    let err = decide(&pod(&bad)).unwrap_err();
    assert_eq!(err.annotation, "traffic.kuma.io/exclude-inbound-ports");
    // The same annotation on a pod that is not ours is never read.
    let not_ours = bad.replace("{name: kuma-sidecar}", "{name: other}");
    assert_eq!(decide(&pod(&not_ours)).unwrap(), Decision::PassThrough(PassReason::NoSidecar));
}
