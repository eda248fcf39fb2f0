//! Fetching the pod from the API server: bounded attempts inside one overall deadline,
//! the kubeconfig re-read on every attempt (the installer rewrites it when the bound
//! service-account token rotates).

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use tokio::time::{Instant, sleep, timeout_at};

#[derive(Debug)]
pub enum Lookup {
    Found(Box<Pod>),
    /// The pod is gone (deleted meanwhile): nothing to do for it.
    NotFound,
    /// The API server could not say; the reason is for the log and the error.
    Unavailable(String),
    /// The API server refuses our identity this pod (403: RBAC, or a namespace outside
    /// the chart's namespaceAllowList). Asking again, now or later, gets the same answer.
    Forbidden(String),
}

/// One attempt's own bound, so that a hung connection leaves time for another.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1500);
const FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// The installer's kubeconfig is a few KiB (a CA and a token).
const MAX_KUBECONFIG: u64 = 1 << 20;

/// The kubeconfig as it is on disk now: a regular file, read without blocking, bounded.
pub fn read_kubeconfig(path: &Path) -> Result<Kubeconfig, String> {
    let text = netns::hostfile::read_regular_text(path, MAX_KUBECONFIG).map_err(|e| format!("kubeconfig: {e}"))?;
    Kubeconfig::from_yaml(&text).map_err(|e| format!("kubeconfig {}: {e}", path.display()))
}

/// A client from the kubeconfig as it is on disk now, every call bounded by `timeout`.
pub async fn client_for(kubeconfig: &Path, timeout: Duration) -> Result<Client, String> {
    let kc = read_kubeconfig(kubeconfig)?;
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("kubeconfig {}: {e}", kubeconfig.display()))?;
    config.connect_timeout = Some(timeout);
    config.read_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    Client::try_from(config).map_err(|e| format!("API client: {e}"))
}

/// Whether another attempt may succeed where this one failed.
fn retriable(error: &kube::Error) -> bool {
    match error {
        // 401 can be a token that rotated after we read the kubeconfig; 429 and 5xx pass.
        kube::Error::Api(status) => matches!(status.code, 401 | 429 | 500..=599),
        // A request that cannot be built now will not be built on a later attempt either.
        kube::Error::BuildRequest(_) | kube::Error::HttpError(_) | kube::Error::InferConfig(_) => false,
        kube::Error::InferKubeconfig(_) => false,
        _ => true,
    }
}

/// A failed attempt, with its message.
enum Failed {
    /// Another attempt may succeed.
    Retry(String),
    Final(String),
    Forbidden(String),
}

async fn attempt(kubeconfig: &Path, namespace: &str, name: &str) -> Result<Option<Pod>, Failed> {
    // The installer replaces the kubeconfig atomically: one that cannot make a client now
    // is broken, not half-written, so it fails at once rather than for the whole budget.
    let client = client_for(kubeconfig, ATTEMPT_TIMEOUT).await.map_err(Failed::Final)?;
    Api::<Pod>::namespaced(client, namespace).get_opt(name).await.map_err(|e| match &e {
        kube::Error::Api(status) if status.code == 403 => Failed::Forbidden(e.to_string()),
        _ if retriable(&e) => Failed::Retry(e.to_string()),
        _ => Failed::Final(e.to_string()),
    })
}

pub async fn pod(kubeconfig: &Path, namespace: &str, name: &str, deadline: Duration) -> Lookup {
    let deadline = Instant::now() + deadline;
    let mut backoff = FIRST_BACKOFF;
    let mut last_error;
    loop {
        let started = Instant::now();
        let attempt_deadline = deadline.min(started + ATTEMPT_TIMEOUT);
        match timeout_at(attempt_deadline, attempt(kubeconfig, namespace, name)).await {
            Ok(Ok(Some(pod))) => return Lookup::Found(Box::new(pod)),
            Ok(Ok(None)) => return Lookup::NotFound,
            Ok(Err(Failed::Forbidden(e))) => return Lookup::Forbidden(e),
            Ok(Err(Failed::Final(e))) => return Lookup::Unavailable(e),
            Ok(Err(Failed::Retry(e))) => last_error = e,
            Err(_) => last_error = format!("no answer within {:?}", started.elapsed()),
        }
        if Instant::now() + backoff >= deadline {
            return Lookup::Unavailable(last_error);
        }
        tracing::debug!(error = %last_error, "pod lookup failed; retrying");
        sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(800));
    }
}
