//! The `traffic.kuma.io/transparent-proxy-config` annotation: Kuma's transparent-proxy
//! configuration as YAML, laid over the defaults.
//!
//! The document is walked by hand rather than deserialized so that every error names
//! the exact field path and value, and unknown keys (newer Kuma versions add some) are
//! tolerated and reported at debug level.

use serde_norway::Value;

use crate::error::ConfigError;
use crate::model::{Config, IpFamilyMode, TrafficFlow, VnetNetwork};
use crate::{TRANSPARENT_PROXY_CONFIG, values};

/// The API server caps all of a pod's annotations together at this size.
const MAX_DOCUMENT: usize = 256 * 1024;
/// Far deeper than the configuration goes (four levels); the parser's time grows with
/// the square of the depth, so `[[[...]]]` must be refused before it is parsed.
const MAX_DEPTH: usize = 32;

/// The deepest nesting of flow collections (`[`, `{`) outside quoted strings and comments.
fn flow_depth(text: &str) -> usize {
    let (mut depth, mut max, mut quote, mut comment) = (0usize, 0usize, None, false);
    let mut prev = b'\n';
    let mut bytes = text.bytes().peekable();
    while let Some(b) = bytes.next() {
        match (quote, b) {
            _ if comment => comment = b != b'\n',
            (Some(b'"'), b'\\') => {
                bytes.next();
            }
            (Some(q), _) if b == q => quote = None,
            (Some(_), _) => {}
            // A quote opens a scalar only where one starts (`it's` is plain text).
            (None, b'"' | b'\'') if prev.is_ascii_whitespace() || b"[{,:".contains(&prev) => quote = Some(b),
            (None, b'#') if prev.is_ascii_whitespace() => comment = true,
            (None, b'[' | b'{') => {
                depth += 1;
                max = max.max(depth);
            }
            (None, b']' | b'}') => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = b;
    }
    max
}

/// Parses the annotation's YAML over `Config::default()`.
pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
    let refuse = |reason: String| ConfigError::new(TRANSPARENT_PROXY_CONFIG, "(document)", text, reason);
    if text.len() > MAX_DOCUMENT {
        return Err(refuse(format!("the document is {} bytes; at most {MAX_DOCUMENT} are accepted", text.len())));
    }
    if flow_depth(text) > MAX_DEPTH {
        return Err(refuse(format!("collections nested deeper than {MAX_DEPTH} levels")));
    }
    let doc: Value = serde_norway::from_str(text)
        .map_err(|e| ConfigError::new(TRANSPARENT_PROXY_CONFIG, "(document)", text, format!("malformed YAML: {e}")))?;
    let mut cfg = Config::default();
    let root = Node { value: &doc, path: String::new() };
    for (key, node) in root.fields()? {
        match key {
            "kumaDPUser" => cfg.uid = node.parse_with(values::uid)?,
            "ipFamilyMode" => cfg.ip_family_mode = node.parse_with(ip_family_mode)?,
            "dropInvalidPackets" => cfg.drop_invalid_packets = node.boolean()?,
            "redirect" => redirect(&node, &mut cfg)?,
            "log" => {
                for (key, node) in node.fields()? {
                    match key {
                        "enabled" => cfg.log.enabled = node.boolean()?,
                        "level" => cfg.log.level = node.bounded_int(0, 7)? as u8,
                        _ => node.unknown(),
                    }
                }
            }
            "wait" => cfg.wait = node.bounded_int(0, 3600)? as u32,
            "waitInterval" => cfg.wait_interval = node.bounded_int(0, 60_000_000)? as u32,
            "retry" => {
                for (key, node) in node.fields()? {
                    match key {
                        "maxRetries" => cfg.retry.max_retries = node.bounded_int(0, 100)? as u32,
                        "sleepBetweenRetries" => cfg.retry.sleep_between_retries = node.parse_with(values::duration)?,
                        _ => node.unknown(),
                    }
                }
            }
            "comments" => {
                for (key, node) in node.fields()? {
                    match key {
                        "disabled" => cfg.comments = !node.boolean()?,
                        _ => node.unknown(),
                    }
                }
            }
            "cniMode" => cfg.cni_mode = node.boolean()?,
            _ => node.unknown(),
        }
    }
    Ok(cfg)
}

fn ip_family_mode(text: &str) -> Result<IpFamilyMode, String> {
    match text.trim() {
        "dualstack" => Ok(IpFamilyMode::DualStack),
        "ipv4" => Ok(IpFamilyMode::Ipv4),
        _ => Err("expected dualstack or ipv4".into()),
    }
}

fn redirect(node: &Node<'_>, cfg: &mut Config) -> Result<(), ConfigError> {
    for (key, node) in node.fields()? {
        match key {
            "inbound" => traffic_flow(&node, &mut cfg.inbound)?,
            "outbound" => traffic_flow(&node, &mut cfg.outbound)?,
            "dns" => {
                for (key, node) in node.fields()? {
                    match key {
                        "enabled" => cfg.dns.enabled = node.boolean()?,
                        "port" => cfg.dns.port = node.parse_with(values::port)?,
                        "captureAll" => cfg.dns.capture_all = node.boolean()?,
                        "skipConntrackZoneSplit" => cfg.dns.skip_conntrack_zone_split = node.boolean()?,
                        "resolvConfigPath" => cfg.dns.resolv_conf_path = node.string()?,
                        _ => node.unknown(),
                    }
                }
            }
            "vnet" => {
                for (key, node) in node.fields()? {
                    match key {
                        "networks" => cfg.vnet = node.list_with(vnet_network)?,
                        _ => node.unknown(),
                    }
                }
            }
            _ => node.unknown(),
        }
    }
    Ok(())
}

fn traffic_flow(node: &Node<'_>, flow: &mut TrafficFlow) -> Result<(), ConfigError> {
    for (key, node) in node.fields()? {
        match key {
            "enabled" => flow.enabled = node.boolean()?,
            "port" => flow.port = node.parse_with(values::port)?,
            "excludePorts" => flow.exclude_ports = node.list_with(values::port)?,
            "includePorts" => flow.include_ports = node.list_with(values::port)?,
            "excludePortsForUIDs" => {
                flow.exclude_ports_for_uids = match node.value {
                    // A single string may hold several `;`-separated entries, like the legacy annotation.
                    Value::String(s) => node.wrap(s, values::uid_port_exclusions(s.split(';')))?,
                    _ => node.list_with(values::uid_port_exclusion)?,
                }
            }
            "excludePortsForIPs" => flow.exclude_ips = node.list_with(values::ip_or_cidr)?,
            "insertRedirectInsteadOfAppend" => flow.insert_redirect_instead_of_append = node.boolean()?,
            _ => node.unknown(),
        }
    }
    Ok(())
}

/// `interface:cidr`; only the first `:` separates, so IPv6 CIDRs work.
pub(crate) fn vnet_network(text: &str) -> Result<VnetNetwork, String> {
    let (interface, cidr) = text
        .trim()
        .split_once(':')
        .ok_or_else(|| "expected interface:cidr, such as docker0:172.17.0.0/16".to_string())?;
    let valid_name = !interface.is_empty()
        && interface.len() <= 15
        && interface.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@+".contains(&b));
    if !valid_name {
        return Err(format!("{interface:?} is not a valid interface name"));
    }
    let cidr = cidr.parse::<ipnet::IpNet>().map_err(|_| format!("{cidr:?} is not a CIDR such as 172.17.0.0/16"))?;
    Ok(VnetNetwork { interface: interface.to_owned(), cidr: cidr.trunc() })
}

/// A position in the document, for error messages.
struct Node<'a> {
    value: &'a Value,
    path: String,
}

impl<'a> Node<'a> {
    fn child(&self, key: &str, value: &'a Value) -> Node<'a> {
        let path = if self.path.is_empty() { key.to_owned() } else { format!("{}.{key}", self.path) };
        Node { value, path }
    }

    fn error(&self, reason: impl Into<String>) -> ConfigError {
        ConfigError::new(TRANSPARENT_PROXY_CONFIG, &self.field_name(), &scalar_text(self.value), reason)
    }

    fn field_name(&self) -> String {
        if self.path.is_empty() { "(document)".to_owned() } else { self.path.clone() }
    }

    fn wrap<T>(&self, text: &str, result: Result<T, String>) -> Result<T, ConfigError> {
        result.map_err(|reason| ConfigError::new(TRANSPARENT_PROXY_CONFIG, &self.field_name(), text, reason))
    }

    fn unknown(&self) {
        tracing::debug!(field = %self.path, "ignoring unknown field of {TRANSPARENT_PROXY_CONFIG}");
    }

    /// The entries of a mapping (null counts as empty), keys as strings.
    fn fields(&self) -> Result<Vec<(&'a str, Node<'a>)>, ConfigError> {
        let map = match self.value {
            Value::Mapping(m) => m,
            Value::Null => return Ok(Vec::new()),
            _ => return Err(self.error("expected a mapping")),
        };
        let mut out = Vec::with_capacity(map.len());
        for (k, v) in map {
            let key = k.as_str().ok_or_else(|| self.error(format!("key {} is not a string", scalar_text(k))))?;
            out.push((key, self.child(key, v)));
        }
        Ok(out)
    }

    fn boolean(&self) -> Result<bool, ConfigError> {
        match self.value {
            Value::Bool(b) => Ok(*b),
            Value::String(s) => self.wrap(s, values::boolean(s)),
            _ => Err(self.error("expected true or false")),
        }
    }

    fn string(&self) -> Result<String, ConfigError> {
        match self.value {
            Value::String(s) => Ok(s.clone()),
            _ => Err(self.error("expected a string")),
        }
    }

    fn bounded_int(&self, min: u64, max: u64) -> Result<u64, ConfigError> {
        match self.value {
            Value::Number(n) => match n.as_u64() {
                Some(v) if (min..=max).contains(&v) => Ok(v),
                _ => Err(self.error(format!("expected a whole number in {min}..={max}"))),
            },
            Value::String(s) => match s.trim().parse::<u64>() {
                Ok(v) if (min..=max).contains(&v) => Ok(v),
                _ => Err(self.error(format!("expected a whole number in {min}..={max}"))),
            },
            _ => Err(self.error(format!("expected a whole number in {min}..={max}"))),
        }
    }

    /// A scalar (string or number) given to a text parser.
    fn parse_with<T>(&self, parse: impl Fn(&str) -> Result<T, String>) -> Result<T, ConfigError> {
        match self.value {
            Value::String(s) => self.wrap(s, parse(s)),
            Value::Number(n) => self.wrap(&n.to_string(), parse(&n.to_string())),
            _ => Err(self.error("expected a single value")),
        }
    }

    /// A YAML list of scalars, a comma-separated string, or one scalar; null is empty.
    fn list_with<T>(&self, parse: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, ConfigError> {
        match self.value {
            Value::Null => Ok(Vec::new()),
            Value::Sequence(items) => {
                self.wrap(&scalar_text(self.value), values::check_list_len(items.len()))?;
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| Node { value: item, path: format!("{}[{i}]", self.path) }.parse_with(&parse))
                    .collect()
            }
            Value::String(s) => {
                let entries = self.wrap(s, values::comma_entries(s))?;
                entries.into_iter().map(|e| self.wrap(s, parse(e))).collect()
            }
            Value::Number(_) => Ok(vec![self.parse_with(parse)?]),
            _ => Err(self.error("expected a list")),
        }
    }
}

fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".to_owned(),
        other => serde_norway::to_string(other).unwrap_or_default().trim_end().to_owned(),
    }
}

#[cfg(test)]
mod bounds {
    use super::*;

    #[test]
    fn deep_or_huge_documents_are_refused_before_parsing() {
        // 80k levels took 12.9 s of CPU to parse; refused now without parsing.
        let deep = format!("redirect: {}{}", "[".repeat(80_000), "]".repeat(80_000));
        let started = std::time::Instant::now();
        let err = from_yaml(&deep).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
        assert!(err.reason.contains("nested deeper than 32") && err.annotation == TRANSPARENT_PROXY_CONFIG, "{err}");
        assert!(err.value.len() < 200, "the message is not the whole document");
        let huge = format!("wait: 1\n# {}\n", "x".repeat(MAX_DOCUMENT));
        assert!(from_yaml(&huge).unwrap_err().reason.contains("at most 262144"));
        // Brackets in quoted strings and comments are text; a plain `it's` opens nothing.
        assert_eq!(flow_depth("a: \"[[[[\"\nb: '{{{' # [[[[\nc: [1, [2]]"), 2);
        assert_eq!(flow_depth("log: it's [[[[[[[ ]]]]]]]"), 7);
        assert_eq!(flow_depth(r#"a: "\"[[" "#), 0);
        // The real shape still parses.
        let ok = "redirect:\n  inbound:\n    excludePorts: [1, 2]\n  dns: {enabled: true, port: 15053}\n";
        assert!(from_yaml(ok).is_ok());
    }
}
