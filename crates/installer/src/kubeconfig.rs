//! The kubeconfig the plugin uses to read pods: the API server's address, its CA and
//! the installer's service-account token, all embedded so that the plugin, which runs
//! on the host, never depends on files inside this pod.

use base64::Engine;
use kube::config::{AuthInfo, Cluster, Context, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext};
use secrecy::SecretString;

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

/// The kubeconfig from the service-account files as they are now. Errors name the
/// files, never their content.
pub fn from_files(server: &str, ca_file: &std::path::Path, token_file: &std::path::Path) -> Result<Secret, String> {
    let token = std::fs::read_to_string(token_file)
        .map_err(|e| format!("cannot read the service-account token {}: {e}", token_file.display()))?;
    let ca = std::fs::read(ca_file).map_err(|e| format!("cannot read the API server CA {}: {e}", ca_file.display()))?;
    Ok(render(server, &ca, &Secret::new(token)))
}

/// The kubeconfig, as kube's [`Kubeconfig`] serialized to YAML (its emitter quotes any
/// token or path that would otherwise break the structure).
pub fn render(server: &str, ca_pem: &[u8], token: &Secret) -> Secret {
    let (cluster, user) = ("local", "kong-mesh-cni");
    let config = Kubeconfig {
        api_version: Some("v1".into()),
        kind: Some("Config".into()),
        clusters: vec![NamedCluster {
            name: cluster.into(),
            cluster: Some(Cluster {
                server: Some(server.into()),
                certificate_authority_data: Some(base64::engine::general_purpose::STANDARD.encode(ca_pem)),
                ..Cluster::default()
            }),
            ..NamedCluster::default()
        }],
        auth_infos: vec![NamedAuthInfo {
            name: user.into(),
            auth_info: Some(AuthInfo {
                token: Some(SecretString::from(token.0.trim().to_owned())),
                ..AuthInfo::default()
            }),
            ..NamedAuthInfo::default()
        }],
        contexts: vec![NamedContext {
            name: user.into(),
            context: Some(Context { cluster: cluster.into(), user: Some(user.into()), ..Context::default() }),
            ..NamedContext::default()
        }],
        current_context: Some(user.into()),
        ..Kubeconfig::default()
    };
    // Plain strings, options and maps: serializing cannot fail.
    let yaml = serde_norway::to_string(&config).unwrap_or_default();
    Secret(format!(
        "# Written by the Kong Mesh CNI installer for its plugin; rewritten when the token rotates.\n{yaml}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(server_url("https", "10.96.0.1", "443"), "https://10.96.0.1:443");
        assert_eq!(server_url("https", "fd00:10:96::1", "443"), "https://[fd00:10:96::1]:443");
        assert_eq!(server_url("https", "[fd00::1]", "6443"), "https://[fd00::1]:6443");
        assert_eq!(server_url("http", "api.local", ""), "http://api.local");
    }

    /// What a client reads back from the file.
    fn read(kc: &Secret) -> (String, String, String, String) {
        let config = Kubeconfig::from_yaml(kc.expose()).unwrap();
        assert_eq!(config.current_context.as_deref(), Some("kong-mesh-cni"));
        let context = config.contexts[0].context.clone().unwrap();
        assert_eq!((context.cluster.as_str(), context.user.as_deref()), ("local", Some("kong-mesh-cni")));
        let cluster = config.clusters[0].cluster.clone().unwrap();
        let user = config.auth_infos[0].auth_info.clone().unwrap();
        assert_eq!(config.auth_infos[0].name, "kong-mesh-cni");
        (
            config.clusters[0].name.clone(),
            cluster.server.unwrap(),
            cluster.certificate_authority_data.unwrap(),
            user.token.unwrap().expose_secret().to_owned(),
        )
    }

    #[test]
    fn embeds_ca_and_trimmed_token_and_hides_them_from_debug() {
        let kc = render("https://10.96.0.1:443", b"-----BEGIN CERTIFICATE-----\n", &Secret::new("tok.en\n".into()));
        let (cluster, server, ca, token) = read(&kc);
        assert_eq!((cluster.as_str(), server.as_str()), ("local", "https://10.96.0.1:443"));
        assert_eq!(ca, "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==");
        assert_eq!(token, "tok.en");
        assert!(kc.expose().starts_with("# Written by the Kong Mesh CNI installer"));
        assert!(kc.expose().contains("apiVersion: v1\n") && kc.expose().contains("kind: Config\n"));
        assert!(!format!("{kc:?}").contains("tok.en"));
    }

    #[test]
    fn tokens_and_addresses_that_look_like_yaml_stay_strings() {
        for (server, token) in
            [("https://[fd00::1]:6443", "#not-a-comment: {x}"), ("https://h:1", "'quoted\" - [1]\nline"), ("h", "true")]
        {
            let (_, s, _, t) = read(&render(server, b"", &Secret::new(token.into())));
            assert_eq!((s.as_str(), t.as_str()), (server, token.trim()));
        }
    }
}
