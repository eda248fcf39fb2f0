//! Spec versions and choosing one.

use crate::proto::error::{CniError, code};

pub const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST: &str = "1.1.0";

/// Result format families: 0.3.x and 0.4.0 carry `ips[].version`, 1.x does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    V03,
    V1,
}

pub fn is_supported(version: &str) -> bool {
    SUPPORTED.contains(&version)
}

pub fn format_of(version: &str) -> Option<Format> {
    match version {
        "0.3.0" | "0.3.1" | "0.4.0" => Some(Format::V03),
        "1.0.0" | "1.1.0" => Some(Format::V1),
        _ => None,
    }
}

/// The version to speak: the configured `cniVersion`, or the highest supported one of
/// a `cniVersions` list.
pub fn choose(cni_version: Option<&str>, cni_versions: Option<&[String]>) -> Result<String, CniError> {
    if let Some(v) = cni_version {
        return if is_supported(v) {
            Ok(v.to_owned())
        } else {
            Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                "incompatible CNI version",
                format!("cniVersion {v:?} is not one of {}", SUPPORTED.join(", ")),
            ))
        };
    }
    let listed = cni_versions.unwrap_or_default();
    SUPPORTED.iter().rev().find(|s| listed.iter().any(|l| l == *s)).map(|s| s.to_string()).ok_or_else(|| {
        CniError::new(
            code::INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            if listed.is_empty() {
                "the configuration has neither cniVersion nor cniVersions".to_owned()
            } else {
                format!("none of cniVersions {listed:?} is supported ({})", SUPPORTED.join(", "))
            },
        )
    })
}
