//! Our plugin's configuration: the `CNI_NETWORK_CONFIG` template, rendered.

use serde_json::Value;

use crate::InstallError;

/// The template the chart sets by default.
///
/// `name` is `kuma-cni`: under Multus it is the network that Kuma's injector names in
/// mesh pods' `k8s.v1.cni.cncf.io/networks` annotation; `type` names our binary.
pub const DEFAULT_TEMPLATE: &str = r#"{"cniVersion":"0.3.1","name":"kuma-cni","type":"kong-mesh-cni","log_level":"info","kubernetes":{"kubeconfig":"__KUBECONFIG_FILEPATH__","cni_bin_dir":"/opt/cni/bin","exclude_namespaces":["kube-system"]}}"#;

/// Replaced by the host path of the kubeconfig the installer writes.
pub const KUBECONFIG_PLACEHOLDER: &str = "__KUBECONFIG_FILEPATH__";

/// Plugin types that are ours whatever the template calls the binary: this
/// implementation's and the Go implementation's (`kuma-cni`), so that either replaces
/// the other's entry instead of chaining twice.
pub const KNOWN_TYPES: [&str; 2] = ["kong-mesh-cni", "kuma-cni"];

/// The rendered template.
#[derive(Debug, Clone)]
pub struct Ours {
    /// Verbatim: the standalone conf file's content.
    pub text: String,
    /// Parsed (key order and numbers kept): our entry in a chained conflist.
    pub conf: Value,
    /// The binary's file name in the host bin dir: the template's `type`.
    pub binary: String,
}

impl Ours {
    /// Substitutes the kubeconfig's host path (JSON-escaped, so any path renders to
    /// valid JSON) and checks that the result is one plugin configuration.
    pub fn render(template: &str, kubeconfig_host_path: &str) -> Result<Ours, InstallError> {
        let quoted = serde_json::to_string(kubeconfig_host_path).expect("a string serializes");
        let text = template.replace(KUBECONFIG_PLACEHOLDER, &quoted[1..quoted.len() - 1]);
        let conf: Value = serde_json::from_str(&text).map_err(|e| InstallError::Template(format!("not JSON: {e}")))?;
        let binary = match conf.get("type") {
            Some(Value::String(t)) => t.clone(),
            _ => {
                return Err(InstallError::Template("no \"type\" string: it must be one plugin's configuration".into()));
            }
        };
        // The type names a file in the host's bin dir; it must not point anywhere else.
        if binary.is_empty() || binary == "." || binary == ".." || binary.contains('/') || binary.contains('\0') {
            return Err(InstallError::Template(format!("\"type\" {binary:?} is not a file name")));
        }
        Ok(Ours { text, conf, binary })
    }

    /// eBPF mode: the plugin registers mesh pods with the programs pinned in `bpffs`
    /// instead of writing iptables rules.
    pub fn set_ebpf(&mut self, bpffs: &std::path::Path) {
        self.conf["ebpf"] = serde_json::json!({ "bpffs_path": bpffs });
        self.text = self.conf.to_string();
    }

    /// Whether a plugin entry of a conflist is ours (any of our known types).
    pub fn is_ours(&self, plugin: &Value) -> bool {
        plugin_type(plugin).is_some_and(|t| t == self.binary || KNOWN_TYPES.contains(&t))
    }
}

pub fn plugin_type(plugin: &Value) -> Option<&str> {
    plugin.get("type").and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_template_renders_with_the_host_path() {
        let ours = Ours::render(DEFAULT_TEMPLATE, "/etc/cni/net.d/ZZZ-kuma-cni-kubeconfig").unwrap();
        assert_eq!(ours.binary, "kong-mesh-cni");
        assert_eq!(ours.conf["kubernetes"]["kubeconfig"], "/etc/cni/net.d/ZZZ-kuma-cni-kubeconfig");
        assert_eq!(ours.conf["kubernetes"]["exclude_namespaces"][0], "kube-system");
        assert!(ours.text.starts_with(r#"{"cniVersion":"0.3.1","name":"kuma-cni""#));
    }

    #[test]
    fn kuma_cni_type_names_the_binary_and_both_types_are_ours() {
        let ours =
            Ours::render(&DEFAULT_TEMPLATE.replace(r#""type":"kong-mesh-cni""#, r#""type":"kuma-cni""#), "/k").unwrap();
        assert_eq!(ours.binary, "kuma-cni");
        assert!(ours.is_ours(&serde_json::json!({"type": "kong-mesh-cni"})));
        assert!(ours.is_ours(&serde_json::json!({"type": "kuma-cni"})));
        assert!(!ours.is_ours(&serde_json::json!({"type": "calico"})));
    }

    #[test]
    fn unknown_fields_and_numbers_survive() {
        let ours = Ours::render(
            r#"{"type":"kuma-cni","x":{"big":12345678901234567890123,"f":1.50},"k":"__KUBECONFIG_FILEPATH__"}"#,
            "/a \"b\"",
        )
        .unwrap();
        assert_eq!(serde_json::to_string(&ours.conf["x"]).unwrap(), r#"{"big":12345678901234567890123,"f":1.50}"#);
        assert_eq!(ours.conf["k"], "/a \"b\"");
    }

    #[test]
    fn rejects_what_cannot_be_one_plugin() {
        for bad in ["{", r#"{"plugins":[]}"#, r#"{"type":"../x"}"#, r#"{"type":""}"#, "[1]"] {
            assert!(Ours::render(bad, "/k").is_err(), "{bad}");
        }
    }
}
