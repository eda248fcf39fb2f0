//! The installer's own calls to the API server, with the identity it hands the plugin
//! (the same server, CA and service-account token; kube re-reads the token file, so a
//! rotated token is used at once). Every call is bounded.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::config::{
    AuthInfo, Cluster, Context, KubeConfigOptions, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext,
};
use kube::{Api, Client};

use crate::args::Settings;
use crate::inplace::PodAnswer;

/// Looks a pod up by namespace and name. Injected, so that a pod cache can answer
/// instead of a GET.
pub type PodLookup = Arc<dyn Fn(String, String) -> Pin<Box<dyn Future<Output = PodAnswer> + Send>> + Send + Sync>;

/// Where the API server is and who we are to it.
#[derive(Debug, Clone)]
pub struct Identity {
    server: String,
    ca_file: std::path::PathBuf,
    token_file: std::path::PathBuf,
}

impl Identity {
    pub fn new(s: &Settings) -> Identity {
        Identity { server: s.server.clone(), ca_file: s.ca_file.clone(), token_file: s.token_file.clone() }
    }

    /// A client with our identity: kube re-reads the token file as it rotates. Connects
    /// and writes are bounded by `connect`, each read by `read` (a watch's reads wait
    /// for its next event).
    pub async fn client(&self, connect: Duration, read: Duration) -> Result<Client, String> {
        let name = "kong-mesh-cni";
        let kubeconfig = Kubeconfig {
            clusters: vec![NamedCluster {
                name: name.into(),
                cluster: Some(Cluster {
                    server: Some(self.server.clone()),
                    certificate_authority: Some(self.ca_file.to_string_lossy().into_owned()),
                    ..Cluster::default()
                }),
                ..NamedCluster::default()
            }],
            auth_infos: vec![NamedAuthInfo {
                name: name.into(),
                auth_info: Some(AuthInfo {
                    token_file: Some(self.token_file.to_string_lossy().into_owned()),
                    ..AuthInfo::default()
                }),
                ..NamedAuthInfo::default()
            }],
            contexts: vec![NamedContext {
                name: name.into(),
                context: Some(Context { cluster: name.into(), user: Some(name.into()), ..Context::default() }),
                ..NamedContext::default()
            }],
            current_context: Some(name.into()),
            ..Kubeconfig::default()
        };
        let server = &self.server;
        let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| format!("API client for {server}: {e}"))?;
        config.connect_timeout = Some(connect);
        config.read_timeout = Some(read);
        config.write_timeout = Some(connect);
        Client::try_from(config).map_err(|e| format!("API client for {server}: {e}"))
    }

    /// A GET of the pod, bounded by `timeout` as a whole.
    pub fn pod_lookup(self, timeout: Duration) -> PodLookup {
        Arc::new(move |namespace, name| {
            let identity = self.clone();
            Box::pin(async move {
                let get = async {
                    let client = identity.client(timeout, timeout).await?;
                    Api::<Pod>::namespaced(client, &namespace).get_opt(&name).await.map_err(|e| e.to_string())
                };
                match tokio::time::timeout(timeout, get).await {
                    Ok(Ok(Some(pod))) => PodAnswer::Found(Box::new(pod)),
                    Ok(Ok(None)) => PodAnswer::Gone,
                    Ok(Err(e)) => PodAnswer::Unavailable(e),
                    Err(_) => PodAnswer::Unavailable(format!("no answer within {timeout:?}")),
                }
            })
        })
    }

    /// Says on the pod that its redirect was programmed in place now (the repair
    /// controller then lets its earlier validator failures be), bounded by `timeout`. The
    /// UID, when known, makes sure it is the pod ADD saw.
    pub async fn mark_repaired(
        &self,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
        timeout: Duration,
    ) -> Result<(), String> {
        let now =
            k8s_openapi::jiff::Timestamp::now().round(k8s_openapi::jiff::Unit::Second).map_err(|e| e.to_string())?;
        let mut patch =
            serde_json::json!({"metadata": {"annotations": {kuma::pod::REDIRECT_REPAIRED_AT: now.to_string()}}});
        if let Some(uid) = uid {
            patch["metadata"]["uid"] = uid.into();
        }
        let call = async {
            let client = self.client(timeout, timeout).await?;
            let params = kube::api::PatchParams::default();
            Api::<Pod>::namespaced(client, namespace)
                .patch(name, &params, &kube::api::Patch::Merge(patch))
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        };
        tokio::time::timeout(timeout, call).await.unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
    }

    /// Our DaemonSet, bounded by `timeout` as a whole.
    pub async fn daemonset(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<Option<DaemonSet>, ApiFailure> {
        let get = async {
            let client = self.client(timeout, timeout).await.map_err(ApiFailure::Other)?;
            Api::<DaemonSet>::namespaced(client, namespace).get_opt(name).await.map_err(|e| match e {
                kube::Error::Api(status) => ApiFailure::Status(status.code, status.message),
                e => ApiFailure::Other(e.to_string()),
            })
        };
        tokio::time::timeout(timeout, get)
            .await
            .unwrap_or_else(|_| Err(ApiFailure::Other(format!("no answer within {timeout:?}"))))
    }
}

/// Why a call did not answer with the object (or its absence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiFailure {
    /// The server refused, with this HTTP code and message.
    Status(u16, String),
    /// No answer: connection, TLS, timeout, or our own credentials files.
    Other(String),
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiFailure::Status(code, message) => write!(f, "the API server answered {code}: {message}"),
            ApiFailure::Other(why) => f.write_str(why),
        }
    }
}
