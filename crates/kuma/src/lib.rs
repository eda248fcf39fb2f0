//! Kuma's transparent-proxy configuration for one pod, read from its annotations.
//!
//! Two sources, as Kuma writes them: the YAML annotation
//! `traffic.kuma.io/transparent-proxy-config` (Kuma master) and, when it is absent, the
//! legacy per-key annotations (Kuma 2.x). Invalid values are errors that name the
//! annotation, the field and the value; nothing falls back to a default.

#![forbid(unsafe_code)]

mod error;
pub mod legacy;
mod model;
pub mod pod;
pub mod values;
mod yaml;

use std::collections::BTreeMap;

pub use error::ConfigError;
pub use legacy::from_legacy_annotations;
pub use model::*;
pub use yaml::from_yaml;

/// The annotation holding the whole configuration as YAML.
pub const TRANSPARENT_PROXY_CONFIG: &str = "traffic.kuma.io/transparent-proxy-config";

/// The configuration of a pod: from the YAML annotation when present (it wins over the
/// legacy annotations), otherwise from the legacy annotations.
pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
    match annotations.get(TRANSPARENT_PROXY_CONFIG) {
        Some(text) => from_yaml(text),
        None => from_legacy_annotations(annotations),
    }
}
