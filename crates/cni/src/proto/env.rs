//! The environment a runtime calls a plugin with.

use std::collections::BTreeMap;

use crate::proto::error::{CniError, code};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    /// Empty when the runtime gave none (allowed for DEL).
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs (`K8S_POD_NAME`, ...).
    pub args: BTreeMap<String, String>,
}

impl Env {
    pub fn arg(&self, key: &str) -> &str {
        self.args.get(key).map(String::as_str).unwrap_or_default()
    }

    /// Reads and checks the variables the command needs.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let invalid =
            |details: String| CniError::new(code::INVALID_ENVIRONMENT, "invalid environment variables", details);
        let text = var("CNI_COMMAND").unwrap_or_default();
        let command = Command::parse(&text).ok_or_else(|| {
            invalid(format!("CNI_COMMAND {text:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"))
        })?;
        let required: &[&str] = match command {
            Command::Add | Command::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME"],
            Command::Status | Command::Gc | Command::Version => &[],
        };
        let missing: Vec<&str> = required.iter().copied().filter(|k| var(k).is_none_or(|v| v.is_empty())).collect();
        if !missing.is_empty() {
            return Err(invalid(format!("{text} needs {}", missing.join(", "))));
        }
        let raw_args = var("CNI_ARGS").unwrap_or_default();
        let mut args = BTreeMap::new();
        for pair in raw_args.split(';').filter(|p| !p.is_empty()) {
            let (k, v) =
                pair.split_once('=').ok_or_else(|| invalid(format!("CNI_ARGS entry {pair:?} is not KEY=VALUE")))?;
            args.insert(k.to_owned(), v.to_owned());
        }
        Ok(Env {
            command,
            container_id: var("CNI_CONTAINERID").unwrap_or_default(),
            netns: var("CNI_NETNS").unwrap_or_default(),
            ifname: var("CNI_IFNAME").unwrap_or_default(),
            args,
        })
    }
}
