use std::fmt;

/// A configuration value that cannot be used. It names where the value came from (the
/// annotation), which configuration field it is for, and the value itself, so that the
/// message alone tells the user what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The pod annotation the value was read from.
    pub annotation: String,
    /// The configuration field, as a dotted camelCase path (`redirect.inbound.port`).
    pub field: String,
    /// The offending value, shortened when very long.
    pub value: String,
    pub reason: String,
}

/// Values longer than this are cut in messages: an annotation can be large.
const MAX_VALUE_IN_MESSAGE: usize = 120;

impl ConfigError {
    pub fn new(annotation: &str, field: &str, value: &str, reason: impl Into<String>) -> Self {
        let value = if value.chars().count() > MAX_VALUE_IN_MESSAGE {
            let cut: String = value.chars().take(MAX_VALUE_IN_MESSAGE).collect();
            format!("{cut}... ({} bytes)", value.len())
        } else {
            value.to_owned()
        };
        ConfigError { annotation: annotation.to_owned(), field: field.to_owned(), value, reason: reason.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid value {:?} for field {} in annotation {}: {}",
            self.value, self.field, self.annotation, self.reason
        )
    }
}
