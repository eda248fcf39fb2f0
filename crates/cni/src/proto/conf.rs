//! The network configuration on stdin: the generic part every plugin shares. The
//! plugin's own fields are read from `raw`.

use serde_json::Value;

use crate::proto::error::{CniError, code};
use crate::proto::version;

/// stdin larger than this is refused before parsing: a configuration is a few KiB.
pub const MAX_STDIN: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// The version to answer in.
    pub cni_version: String,
    pub name: String,
    pub plugin_type: String,
    pub prev_result: Option<Value>,
    /// The whole document, for plugin-specific fields.
    pub raw: Value,
}

pub fn invalid(details: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, "invalid network configuration", details)
}

fn string_field<'a>(raw: &'a Value, key: &str) -> Result<Option<&'a str>, CniError> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(format!("field {key} must be a string, not {other}"))),
    }
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let decode =
            |details: String| CniError::new(code::DECODE, "failed to decode the network configuration", details);
        if stdin.len() > MAX_STDIN {
            return Err(decode(format!("stdin is {} bytes; at most {MAX_STDIN} are accepted", stdin.len())));
        }
        let raw: Value = serde_json::from_slice(stdin).map_err(|e| decode(e.to_string()))?;
        if !raw.is_object() {
            return Err(decode("the configuration is not a JSON object".into()));
        }
        let versions: Option<Vec<String>> = match raw.get("cniVersions") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_owned).ok_or_else(|| invalid("cniVersions must be a list of strings"))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(_) => return Err(invalid("cniVersions must be a list of strings")),
        };
        let cni_version = version::choose(string_field(&raw, "cniVersion")?, versions.as_deref())?;
        let name = string_field(&raw, "name")?.unwrap_or_default().to_owned();
        let plugin_type = string_field(&raw, "type")?.ok_or_else(|| invalid("field type is missing"))?.to_owned();
        let prev_result = match raw.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(other) => return Err(invalid(format!("prevResult must be an object, not {other}"))),
        };
        Ok(NetConf { cni_version, name, plugin_type, prev_result, raw })
    }
}
