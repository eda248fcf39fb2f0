//! Results: passing the previous plugin's result on, in the version asked for.

use serde_json::{Map, Value, json};

use crate::proto::conf::invalid;
use crate::proto::error::CniError;
use crate::proto::version::{self, Format};

/// The result to print: `prev` converted to `to` (only the version-specific parts
/// change, every other field is kept as it was), or an empty result when there is no
/// previous result (a standalone plugin).
pub fn pass_on(prev: Option<&Value>, to: &str) -> Result<Value, CniError> {
    let Some(prev) = prev else {
        return Ok(json!({"cniVersion": to, "dns": {}}));
    };
    let mut out = prev.clone();
    let from = prev.get("cniVersion").and_then(Value::as_str).unwrap_or(to).to_owned();
    let (Some(from_format), Some(to_format)) = (version::format_of(&from), version::format_of(to)) else {
        return Err(invalid(format!("prevResult has cniVersion {from:?}, which cannot be converted to {to}")));
    };
    let obj = out.as_object_mut().expect("prevResult is an object");
    if let Some(Value::Array(ips)) = obj.get_mut("ips") {
        for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
            match (from_format, to_format) {
                (Format::V03, Format::V1) => {
                    ip.remove("version");
                }
                (Format::V1, Format::V03) => add_ip_version(ip)?,
                _ => {}
            }
        }
    }
    obj.insert("cniVersion".to_owned(), Value::String(to.to_owned()));
    Ok(out)
}

/// 0.3.x/0.4.0 results name each address's family.
fn add_ip_version(ip: &mut Map<String, Value>) -> Result<(), CniError> {
    let address =
        ip.get("address").and_then(Value::as_str).ok_or_else(|| invalid("prevResult ips[] entry without address"))?;
    let family = if address.contains(':') { "6" } else { "4" };
    ip.insert("version".to_owned(), Value::String(family.to_owned()));
    Ok(())
}

/// The answer to VERSION.
pub fn version_info() -> Value {
    json!({"cniVersion": version::LATEST, "supportedVersions": version::SUPPORTED})
}
