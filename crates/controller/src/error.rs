//! The crate's errors, and the bound every API call runs under.

use std::future::Future;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what}: no answer within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("watch: {0}")]
    Watch(#[from] kube::runtime::watcher::Error),
    #[error("{what}: still conflicting after {attempts} attempts")]
    Conflicts { what: String, attempts: u32 },
    #[error("invalid settings: {0}")]
    Settings(String),
    #[error("kube client configuration: {0}")]
    ClientConfig(#[source] kube::Error),
    #[error(transparent)]
    Listen(#[from] ops::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl Error {
    /// The HTTP status the API server answered with, if it answered.
    pub fn status_code(&self) -> Option<u16> {
        let api = |e: &kube::Error| match e {
            kube::Error::Api(s) => Some(s.code),
            _ => None,
        };
        use kube::runtime::watcher::Error as W;
        match self {
            Error::Api { source, .. } => api(source),
            Error::Watch(W::InitialListFailed(e) | W::WatchStartFailed(e) | W::WatchFailed(e)) => api(e),
            Error::Watch(W::WatchError(s)) => Some(s.code),
            _ => None,
        }
    }

    /// A short, bounded label for metrics: the status code, `timeout`, or `other`.
    pub fn kind(&self) -> String {
        match (self, self.status_code()) {
            (_, Some(code)) => code.to_string(),
            (Error::Timeout { .. }, None) => "timeout".into(),
            (Error::Conflicts { .. }, None) => "conflicts".into(),
            _ => "other".into(),
        }
    }

    pub fn is_status(&self, code: u16) -> bool {
        self.status_code() == Some(code)
    }
}

/// Runs one API call with an upper bound, naming it in the error.
pub async fn bounded<T>(
    timeout: Duration,
    what: impl FnOnce() -> String,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(Error::Api { what: what(), source }),
        Err(_) => Err(Error::Timeout { what: what(), after: timeout }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(kube::core::Status::failure("no", "Forbidden").with_code(code).boxed())
    }

    #[test]
    fn kinds_are_status_codes_or_a_few_words() {
        let e = Error::Api { what: "patch".into(), source: api_error(403) };
        assert_eq!(e.kind(), "403");
        assert!(e.is_status(403));
        let w = Error::Watch(kube::runtime::watcher::Error::InitialListFailed(api_error(403)));
        assert_eq!(w.kind(), "403");
        let t = Error::Timeout { what: "get".into(), after: Duration::from_secs(1) };
        assert_eq!(t.kind(), "timeout");
    }

    #[tokio::test]
    async fn a_call_that_hangs_is_cut_off() {
        let hang = std::future::pending::<Result<(), kube::Error>>();
        let e = bounded(Duration::from_millis(10), || "get node x".into(), hang).await.unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }));
        assert_eq!(e.to_string(), "get node x: no answer within 10ms");
    }
}
