//! CNI configuration files: what one holds, and the text edits that chain our plugin
//! into it and take it out again.
//!
//! Edits splice text (see [`crate::jsontext`]) so that the rest of the file stays byte
//! for byte what its owner wrote, and removal restores the original exactly.

use serde::Serialize;
use serde_json::Value;

use crate::jsontext::{self, Span};
use crate::template::{Ours, plugin_type};

/// Our entry in a conflist made from a `.conf` carries this field, naming that `.conf`:
/// a restarted installer knows from it that the whole `.conflist` is ours to turn back
/// into the original `.conf` on removal.
pub const WRAP_MARKER: &str = "wrapped_conf";

/// The `name` of a conflist made from a `.conf` (the contract's wrapper).
pub const WRAPPER_NAME: &str = "k8s-pod-network";

/// How our wrapper indents the original `.conf` (undone exactly on removal).
const WRAP_INDENT: &str = "    ";

/// What a `.conf` or `.conflist` file holds.
#[derive(Debug, Clone)]
pub enum Parsed {
    /// A `.conf`: one plugin, which runtimes chain with nothing.
    Conf { value: Value },
    /// A `.conflist`.
    List {
        value: Value,
        /// Positions of our entries (any of our known types) in `plugins`.
        ours: Vec<usize>,
        /// For a conflist we made from a `.conf`, that `.conf`'s name.
        wrapped: Option<String>,
    },
}

impl Parsed {
    /// The plugin types that are not ours: the primary CNI, for messages.
    pub fn primary_types(&self, ours: &Ours) -> Vec<String> {
        let plugins: Vec<&Value> = match self {
            Parsed::Conf { value } => vec![value],
            Parsed::List { value, .. } => value["plugins"].as_array().map(|p| p.iter().collect()).unwrap_or_default(),
        };
        plugins.into_iter().filter(|p| !ours.is_ours(p)).filter_map(plugin_type).map(str::to_string).collect()
    }

    /// True when every plugin in the file is ours: our own standalone conf, not a
    /// primary CNI's configuration.
    pub fn only_ours(&self, ours: &Ours) -> bool {
        match self {
            Parsed::Conf { value } => ours.is_ours(value),
            Parsed::List { value, ours: idx, .. } => idx.len() == value["plugins"].as_array().map_or(0, Vec::len),
        }
    }
}

/// Whether `name` is a CNI configuration file name (the extensions runtimes read
/// besides `.json`, which the contract does not chain into).
pub fn is_conf_name(name: &str) -> bool {
    (name.ends_with(".conf") || name.ends_with(".conflist")) && !name.starts_with('.')
}

/// Reads a configuration file, or says why it cannot be chained into.
pub fn classify(name: &str, bytes: &[u8], ours: &Ours) -> Result<Parsed, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
    if !value.is_object() {
        return Err("not a JSON object".into());
    }
    if !name.ends_with(".conflist") {
        if plugin_type(&value).is_none_or(str::is_empty) {
            let why = match value.get("plugins") {
                Some(_) => "it has \"plugins\", but runtimes read a .conf file as one plugin",
                None => "it has no \"type\"",
            };
            return Err(format!("not a plugin configuration: {why}"));
        }
        return Ok(Parsed::Conf { value });
    }
    let plugins = match value.get("plugins") {
        Some(Value::Array(p)) if !p.is_empty() => p,
        Some(Value::Array(_)) => return Err("its \"plugins\" list is empty".into()),
        _ => return Err("it has no \"plugins\" list".into()),
    };
    if let Some(i) = plugins.iter().position(|p| plugin_type(p).is_none_or(str::is_empty)) {
        return Err(format!("plugin #{} has no \"type\"", i + 1));
    }
    let idx: Vec<usize> = (0..plugins.len()).filter(|&i| ours.is_ours(&plugins[i])).collect();
    let wrapped = idx
        .iter()
        .find_map(|&i| plugins[i].get(WRAP_MARKER).and_then(Value::as_str))
        .filter(|conf| name.strip_suffix("list") == Some(*conf))
        .map(str::to_string);
    Ok(Parsed::List { value, ours: idx, wrapped })
}

/// Our entry as it must appear: the rendered template, plus the marker in a wrapper.
pub fn entry(ours: &Ours, wrapped: Option<&str>) -> Value {
    let mut entry = ours.conf.clone();
    if let (Some(conf), Some(map)) = (wrapped, entry.as_object_mut()) {
        map.insert(WRAP_MARKER.into(), Value::String(conf.into()));
    }
    entry
}

/// True when the conflist holds exactly one entry of ours, equal to `desired`, after
/// the first plugin. Entries another chained plugin appended after ours are fine:
/// insisting on being last would fight every other installer that appends itself.
pub fn is_chained(parsed: &Parsed, desired: &Value) -> bool {
    match parsed {
        Parsed::List { value, ours, .. } => matches!(ours[..], [i] if i > 0 && value["plugins"][i] == *desired),
        Parsed::Conf { .. } => false,
    }
}

/// The conflist text with our entries taken out and `desired` appended last.
pub fn merge(text: &str, ours: &Ours, desired: &Value) -> Option<String> {
    append(&without_ours(text, ours)?, desired)
}

/// The conflist text with every entry of ours cut out, separators included: each kept
/// plugin keeps the separator before it, except the first kept one, which takes the
/// place of the first plugin. One pass, so thousands of stale entries cost no more
/// than a re-read.
pub fn without_ours(text: &str, ours: &Ours) -> Option<String> {
    let els = plugin_spans(text)?;
    let (first, last) = (els.first()?, els.last()?);
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..first.start]);
    let mut kept_any = false;
    for (i, el) in els.iter().enumerate() {
        if serde_json::from_str(el.of(text)).is_ok_and(|p: Value| ours.is_ours(&p)) {
            continue;
        }
        match kept_any {
            // The separator that was before it, from the end of the element before.
            true => out.push_str(&text[els[i - 1].end..el.end]),
            false => out.push_str(el.of(text)),
        }
        kept_any = true;
    }
    out.push_str(&text[last.end..]);
    Some(out)
}

/// Appends `entry` after the last plugin, laid out like that plugin: on its own line
/// with the same indentation when the list is one per line, compact when the plugins
/// are written on one line each.
fn append(text: &str, entry: &Value) -> Option<String> {
    let array = jsontext::member(text, "plugins")?;
    let els = jsontext::elements(text, array)?;
    let last = *els.last()?;
    let before_last = match els.len() {
        1 => array.start + 1,
        n => els[n - 2].end + text[els[n - 2].end..last.start].find(',')? + 1,
    };
    let sep = &text[before_last..last.start];
    let last_text = last.of(text);
    let rendered = match (last_text.find('\n'), last_text.rfind('\n')) {
        (Some(first), Some(close)) => {
            let (inner, outer) = (leading_ws(&last_text[first + 1..]), leading_ws(&last_text[close + 1..]));
            let unit = inner.strip_prefix(outer).filter(|u| !u.is_empty()).unwrap_or("  ");
            jsontext::indent(&pretty(entry, unit), outer)
        }
        _ => serde_json::to_string(entry).expect("a Value serializes"),
    };
    Some(format!("{},{sep}{rendered}{}", &text[..last.end], &text[last.end..]))
}

/// A conflist holding the `.conf` text (indented, otherwise verbatim) and our entry,
/// with the `.conf`'s cniVersion (else our template's).
pub fn wrap(conf_text: &str, ours: &Ours, desired: &Value) -> String {
    let version = jsontext::member(conf_text, "cniVersion")
        .map(|s| s.of(conf_text).to_string())
        .unwrap_or_else(|| ours.conf.get("cniVersion").map_or("\"0.3.1\"".into(), Value::to_string));
    let orig = jsontext::indent(conf_text.trim(), WRAP_INDENT);
    let entry = jsontext::indent(&pretty(desired, "  "), WRAP_INDENT);
    format!(
        "{{\n  \"name\": \"{WRAPPER_NAME}\",\n  \"cniVersion\": {version},\n  \"plugins\": [\n{WRAP_INDENT}{orig},\n{WRAP_INDENT}{entry}\n  ]\n}}\n"
    )
}

/// The original `.conf` inside a wrapper made by [`wrap`].
pub fn unwrap(list_text: &str) -> Option<String> {
    let first = *plugin_spans(list_text)?.first()?;
    Some(format!("{}\n", jsontext::dedent(first.of(list_text), WRAP_INDENT)))
}

fn leading_ws(line: &str) -> &str {
    &line[..line.len() - line.trim_start_matches([' ', '\t']).len()]
}

fn plugin_spans(text: &str) -> Option<Vec<Span>> {
    jsontext::elements(text, jsontext::member(text, "plugins")?)
}

fn pretty(value: &Value, unit: &str) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(
        &mut out,
        serde_json::ser::PrettyFormatter::with_indent(unit.as_bytes()),
    );
    value.serialize(&mut ser).expect("a Value serializes");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::DEFAULT_TEMPLATE;

    fn ours() -> Ours {
        Ours::render(DEFAULT_TEMPLATE, "/etc/cni/net.d/ZZZ-kuma-cni-kubeconfig").unwrap()
    }

    #[test]
    fn bad_files_are_named_with_a_reason() {
        let o = ours();
        let cases: [(&str, &str, &str); 7] = [
            ("a.conflist", "{\"plugins\": [{\"type\": \"x\"}", "not valid JSON"),
            ("a.conflist", "", "not valid JSON"),
            ("a.conflist", "[]", "not a JSON object"),
            ("a.conflist", "{\"name\": \"n\"}", "no \"plugins\" list"),
            ("a.conflist", "{\"plugins\": []}", "empty"),
            ("a.conflist", "{\"plugins\": [{\"type\": \"a\"}, {\"x\": 1}]}", "plugin #2"),
            ("a.conf", "{\"plugins\": [{\"type\": \"a\"}]}", "one plugin"),
        ];
        for (name, text, why) in cases {
            let err = classify(name, text.as_bytes(), &o).unwrap_err();
            assert!(err.contains(why), "{name} {text:?}: {err}");
        }
        assert!(classify("a.conf", b"\xff", &o).unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn numbers_and_layout_survive_merge_and_removal() {
        let o = ours();
        let text = "{\"cniVersion\":\"1.0.0\",\"x\":1.10,\"big\":123456789012345678901234567890,\"plugins\":[{\"type\":\"a\",\"mtu\":1.5e3}]}";
        let merged = merge(text, &o, &o.conf).unwrap();
        assert!(merged.starts_with("{\"cniVersion\":\"1.0.0\",\"x\":1.10,\"big\":123456789012345678901234567890,\"plugins\":[{\"type\":\"a\",\"mtu\":1.5e3},{\"cniVersion\""));
        assert!(is_chained(&classify("a.conflist", merged.as_bytes(), &o).unwrap(), &o.conf));
        assert_eq!(without_ours(&merged, &o).unwrap(), text);
    }

    #[test]
    fn old_entries_of_ours_are_replaced_wherever_they_are() {
        let o = ours();
        let text = "{\"plugins\": [\n  {\"type\": \"kuma-cni\"},\n  {\"type\": \"calico\"},\n  {\"type\": \"kong-mesh-cni\", \"log_level\": \"debug\"},\n  {\"type\": \"portmap\"}\n]}";
        let merged = merge(text, &o, &o.conf).unwrap();
        let value: Value = serde_json::from_str(&merged).unwrap();
        let types: Vec<&str> =
            value["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["calico", "portmap", "kong-mesh-cni"]);
        assert_eq!(value["plugins"][2], o.conf);
    }

    /// The removal is one pass: 4,000 stale entries (6.2 s before, quadratic) take a
    /// moment, and come out exactly as removing them one by one did.
    #[test]
    fn thousands_of_old_entries_are_removed_in_one_pass() {
        let o = ours();
        let mut plugins = vec!["{\"type\": \"calico\"}".to_string()];
        for i in 0..4000 {
            plugins.push(format!("{{\"type\": \"kong-mesh-cni\", \"n\": {i}}}"));
            if i % 1000 == 0 {
                plugins.push(format!("{{\"type\": \"portmap\", \"n\": {i}}}"));
            }
        }
        let text = format!("{{\"plugins\": [\n  {}\n]}}\n", plugins.join(",\n  "));
        let started = std::time::Instant::now();
        let out = without_ours(&text, &o).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "took {:?}", started.elapsed());
        let kept: Vec<&String> = plugins.iter().filter(|p| !p.contains("kong-mesh-cni")).collect();
        let want =
            format!("{{\"plugins\": [\n  {}\n]}}\n", kept.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",\n  "));
        assert_eq!(out, want);
        // Ours first, or only ours: the same cuts as before.
        assert_eq!(
            without_ours("{\"plugins\": [{\"type\": \"kuma-cni\"}, {\"type\": \"a\"}]}", &o).unwrap(),
            "{\"plugins\": [{\"type\": \"a\"}]}"
        );
        assert_eq!(without_ours("{\"plugins\": [ {\"type\": \"kuma-cni\"} ]}", &o).unwrap(), "{\"plugins\": [  ]}");
    }

    #[test]
    fn chained_means_once_equal_and_not_first() {
        let o = ours();
        let list = |plugins: Vec<Value>| {
            classify("a.conflist", serde_json::json!({"plugins": plugins}).to_string().as_bytes(), &o).unwrap()
        };
        let calico = serde_json::json!({"type": "calico"});
        assert!(is_chained(&list(vec![calico.clone(), o.conf.clone()]), &o.conf));
        assert!(is_chained(
            &list(vec![calico.clone(), o.conf.clone(), serde_json::json!({"type": "istio-cni"})]),
            &o.conf
        ));
        assert!(!is_chained(&list(vec![o.conf.clone(), calico.clone()]), &o.conf));
        assert!(!is_chained(&list(vec![calico.clone(), o.conf.clone(), o.conf.clone()]), &o.conf));
        assert!(!is_chained(&list(vec![calico, serde_json::json!({"type": "kuma-cni"})]), &o.conf));
    }

    #[test]
    fn wrapper_is_recognised_and_unwraps_to_the_original() {
        let o = ours();
        let conf = "{\n  \"cniVersion\": \"0.3.1\",\n  \"name\": \"cbr0\",\n  \"type\": \"flannel\"\n}\n";
        let wrapped = wrap(conf, &o, &entry(&o, Some("10-flannel.conf")));
        match classify("10-flannel.conflist", wrapped.as_bytes(), &o).unwrap() {
            Parsed::List { wrapped: w, ours, .. } => {
                assert_eq!((w.as_deref(), ours), (Some("10-flannel.conf"), vec![1]))
            }
            other => panic!("{other:?}"),
        }
        // The marker names the .conf this list was made from, not any other.
        let Parsed::List { wrapped: w, .. } = classify("20-other.conflist", wrapped.as_bytes(), &o).unwrap() else {
            panic!()
        };
        assert_eq!(w, None);
        assert_eq!(unwrap(&wrapped).unwrap(), conf);
        // No trailing newline or a reformatted wrapper: still the same JSON.
        let bare = conf.trim_end();
        let reformatted =
            serde_json::to_string(&serde_json::from_str::<Value>(&wrap(bare, &o, &o.conf)).unwrap()).unwrap();
        let back: Value = serde_json::from_str(&unwrap(&reformatted).unwrap()).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(conf).unwrap());
    }

    #[test]
    fn wrap_takes_the_conf_version_or_ours() {
        let o = ours();
        let with = wrap("{\"cniVersion\": \"1.0.0\", \"type\": \"ptp\"}", &o, &o.conf);
        assert_eq!(serde_json::from_str::<Value>(&with).unwrap()["cniVersion"], "1.0.0");
        let without = wrap("{\"type\": \"ptp\"}", &o, &o.conf);
        assert_eq!(serde_json::from_str::<Value>(&without).unwrap()["cniVersion"], "0.3.1");
    }
}
