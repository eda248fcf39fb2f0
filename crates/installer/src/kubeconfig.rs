//! The kubeconfig the plugin uses to read pods: the API server's address, its CA and
//! the installer's service-account token, all embedded so that the plugin, which runs
//! on the host, never depends on files inside this pod.

use base64::Engine;

/// Text that must never reach a log: the token, and the kubeconfig holding it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// `protocol://host:port`, with an IPv6 host in brackets.
pub fn server_url(protocol: &str, host: &str, port: &str) -> String {
    let host = match host.contains(':') && !host.starts_with('[') {
        true => format!("[{host}]"),
        false => host.to_string(),
    };
    match port.is_empty() {
        true => format!("{protocol}://{host}"),
        false => format!("{protocol}://{host}:{port}"),
    }
}

/// The kubeconfig, in YAML with every value a double-quoted scalar (JSON string syntax
/// is valid YAML there), so no token or path can break its structure.
pub fn render(server: &str, ca_pem: &[u8], token: &Secret) -> Secret {
    let q = |s: &str| serde_json::to_string(s).expect("a string serializes");
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let lines = [
        "# Written by the Kong Mesh CNI installer for its plugin; rewritten when the token rotates.".to_string(),
        "apiVersion: v1".into(),
        "kind: Config".into(),
        "clusters:".into(),
        "- name: local".into(),
        "  cluster:".into(),
        format!("    server: {}", q(server)),
        format!("    certificate-authority-data: {}", q(&ca)),
        "users:".into(),
        "- name: kong-mesh-cni".into(),
        "  user:".into(),
        format!("    token: {}", q(token.0.trim())),
        "contexts:".into(),
        "- name: kong-mesh-cni".into(),
        "  context:".into(),
        "    cluster: local".into(),
        "    user: kong-mesh-cni".into(),
        "current-context: kong-mesh-cni".into(),
    ];
    Secret(lines.join("\n") + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(server_url("https", "10.96.0.1", "443"), "https://10.96.0.1:443");
        assert_eq!(server_url("https", "fd00:10:96::1", "443"), "https://[fd00:10:96::1]:443");
        assert_eq!(server_url("https", "[fd00::1]", "6443"), "https://[fd00::1]:6443");
        assert_eq!(server_url("http", "api.local", ""), "http://api.local");
    }

    #[test]
    fn embeds_ca_and_trimmed_token_and_hides_them_from_debug() {
        let kc = render("https://10.96.0.1:443", b"-----BEGIN CERTIFICATE-----\n", &Secret::new("tok.en\n".into()));
        let text = kc.expose();
        assert!(text.contains("server: \"https://10.96.0.1:443\""));
        assert!(text.contains("certificate-authority-data: \"LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==\""));
        assert!(text.contains("token: \"tok.en\"\n"));
        assert!(!format!("{kc:?}").contains("tok.en"));
    }
}
