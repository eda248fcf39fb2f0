use serde_json::json;

/// The error codes of the CNI spec that we answer with, and ours (100 and up).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// Ours: programming the redirect rules failed.
    pub const RULES_FAILED: u32 = 100;
    /// Ours: CHECK found rules missing.
    pub const RULES_MISSING: u32 = 101;
    /// Ours: the plugin failed in a way it did not foresee (a bug; see its log).
    pub const INTERNAL: u32 = 102;
}

/// An error in the caller's protocol: printed as the spec's JSON on stdout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError { code, msg: msg.into(), details: details.into() }
    }

    pub fn to_json(&self, cni_version: &str) -> String {
        json!({"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}).to_string()
    }
}
