//! Validation of the values against the chart's `values.schema.json`, as Helm does it
//! before rendering (Helm 3.22 validates with santhosh-tekuri/jsonschema; each failure is
//! a line `- at '<JSON pointer>': <message>` in the same words).
//!
//! Only the keywords the chart's schema uses are implemented: `type`, `properties`,
//! `additionalProperties` (false or a schema), `items`, `enum`, `minimum`, `maximum`,
//! plus the annotations `$schema`, `title`, `description`. A schema with any other
//! keyword is refused (it would validate differently from Helm, never silently).

use std::collections::BTreeSet;

use serde_json::Value as Json;

use crate::value::Value;

const ANNOTATIONS: &[&str] = &["$schema", "title", "description"];
const KEYWORDS: &[&str] = &["type", "properties", "additionalProperties", "items", "enum", "minimum", "maximum"];

/// Parses and checks a schema: only the implemented subset, well-formed.
pub fn parse(text: &str) -> Result<Json, String> {
    let schema: Json = serde_json::from_str(text).map_err(|e| format!("values.schema.json: {e}"))?;
    check_subset(&schema, "")?;
    Ok(schema)
}

fn check_subset(schema: &Json, at: &str) -> Result<(), String> {
    let obj = match schema {
        Json::Bool(_) => return Ok(()),
        Json::Object(o) => o,
        _ => return Err(format!("values.schema.json at '{at}': a schema must be an object or a boolean")),
    };
    for (k, v) in obj {
        if ANNOTATIONS.contains(&k.as_str()) {
            continue;
        }
        if !KEYWORDS.contains(&k.as_str()) {
            return Err(format!("values.schema.json at '{at}': keyword {k:?} is not implemented by this renderer"));
        }
        let bad = |what: &str| Err(format!("values.schema.json at '{at}/{k}': must be {what}"));
        match (k.as_str(), v) {
            ("properties", Json::Object(props)) => {
                for (name, sub) in props {
                    check_subset(sub, &format!("{at}/properties/{}", pointer_token(name)))?;
                }
            }
            ("properties", _) => return bad("an object"),
            ("additionalProperties" | "items", sub) => check_subset(sub, &format!("{at}/{k}"))?,
            ("type", Json::String(t)) if TYPES.contains(&t.as_str()) => {}
            ("type", Json::Array(ts)) if ts.iter().all(|t| t.as_str().is_some_and(|t| TYPES.contains(&t))) => {}
            ("type", _) => return bad("a type name or a list of them"),
            ("enum", Json::Array(_)) => {}
            ("enum", _) => return bad("a list"),
            ("minimum" | "maximum", Json::Number(_)) => {}
            ("minimum" | "maximum", _) => return bad("a number"),
            _ => unreachable!("every keyword is matched above"),
        }
    }
    Ok(())
}

const TYPES: &[&str] = &["null", "boolean", "integer", "number", "string", "array", "object"];

/// The failures of `values` against `schema`, one line each (`at '<ptr>': <message>`),
/// sorted. Empty when the values are valid.
pub fn validate(schema: &Json, values: &Value) -> Vec<String> {
    let mut out = Vec::new();
    check(schema, values, "", &mut out);
    out.sort();
    out
}

/// Helm's error text for these failures (`chart` is the chart's name).
pub fn message(chart: &str, failures: &[String]) -> String {
    let lines: Vec<String> = failures.iter().map(|f| format!("- {f}")).collect();
    format!(
        "values don't meet the specifications of the schema(s) in the following chart(s):\n{chart}:\n{}",
        lines.join("\n")
    )
}

fn check(schema: &Json, value: &Value, at: &str, out: &mut Vec<String>) {
    let obj = match schema {
        Json::Bool(true) => return,
        Json::Bool(false) => return out.push(format!("at '{at}': false schema")),
        Json::Object(o) => o,
        _ => return,
    };
    if let Some(t) = obj.get("type") {
        let mut want: Vec<&str> = match t {
            Json::String(s) => vec![s.as_str()],
            Json::Array(a) => a.iter().filter_map(Json::as_str).collect(),
            _ => Vec::new(),
        };
        if !want.iter().any(|w| has_type(value, w)) {
            // A failed type stops the checks of this location (as in Helm's validator).
            want.sort_unstable();
            return out.push(format!("at '{at}': got {}, want {}", type_of(value), want.join(" or ")));
        }
    }
    if let Some(Json::Array(options)) = obj.get("enum")
        && !options.iter().any(|o| equal(o, value))
    {
        let shown: Vec<String> = options.iter().map(show).collect();
        match shown.as_slice() {
            [one] => out.push(format!("at '{at}': value must be {one}")),
            _ => out.push(format!("at '{at}': value must be one of {}", shown.join(", "))),
        }
    }
    if let Some(n) = number(value) {
        if let Some(min) = obj.get("minimum").and_then(Json::as_f64)
            && n < min
        {
            out.push(format!("at '{at}': minimum: got {}, want {}", grouped(n), grouped(min)));
        }
        if let Some(max) = obj.get("maximum").and_then(Json::as_f64)
            && n > max
        {
            out.push(format!("at '{at}': maximum: got {}, want {}", grouped(n), grouped(max)));
        }
    }
    match value {
        Value::Map(map) => {
            let props = obj.get("properties").and_then(Json::as_object);
            let mut extra = BTreeSet::new();
            for (k, v) in map {
                let here = format!("{at}/{}", pointer_token(k));
                match (props.and_then(|p| p.get(k)), obj.get("additionalProperties")) {
                    (Some(sub), _) => check(sub, v, &here, out),
                    (None, Some(Json::Bool(false))) => {
                        extra.insert(format!("'{k}'"));
                    }
                    (None, Some(sub)) => check(sub, v, &here, out),
                    (None, None) => {}
                }
            }
            if !extra.is_empty() {
                let names: Vec<String> = extra.into_iter().collect();
                out.push(format!("at '{at}': additional properties {} not allowed", names.join(", ")));
            }
        }
        Value::List(items) => {
            if let Some(sub) = obj.get("items") {
                for (i, v) in items.iter().enumerate() {
                    check(sub, v, &format!("{at}/{i}"), out);
                }
            }
        }
        _ => {}
    }
}

/// RFC 6901: `~` and `/` in a key are escaped.
fn pointer_token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) => Some(*f),
        _ => None,
    }
}

fn has_type(value: &Value, want: &str) -> bool {
    match (value, want) {
        (Value::Nil, "null") | (Value::Bool(_), "boolean") | (Value::Str(_), "string") => true,
        (Value::List(_), "array") | (Value::Map(_), "object") => true,
        (Value::Int(_) | Value::Float(_), "number") | (Value::Int(_), "integer") => true,
        (Value::Float(f), "integer") => f.fract() == 0.0,
        _ => false,
    }
}

fn type_of(value: &Value) -> &'static str {
    match value {
        Value::Nil => "null",
        Value::Bool(_) => "boolean",
        Value::Int(_) | Value::Float(_) => "number",
        Value::Str(_) => "string",
        Value::List(_) => "array",
        Value::Map(_) | Value::Files => "object",
    }
}

fn equal(option: &Json, value: &Value) -> bool {
    match (option, value) {
        (Json::Null, Value::Nil) => true,
        (Json::Bool(a), Value::Bool(b)) => a == b,
        (Json::String(a), Value::Str(b)) => a == b,
        (Json::Number(a), v) => a.as_f64().zip(number(v)).is_some_and(|(a, b)| a == b),
        _ => false,
    }
}

/// An enum option as Helm's validator prints it: strings in single quotes, null as Go's
/// `<nil>`, the rest as JSON.
fn show(option: &Json) -> String {
    match option {
        Json::String(s) => format!("'{s}'"),
        Json::Null => "<nil>".into(),
        other => other.to_string(),
    }
}

/// A number as the validator prints it: thousands grouped with commas (70,000).
fn grouped(n: f64) -> String {
    if n.fract() != 0.0 || n.abs() >= 1e15 {
        return crate::value::go_float(n);
    }
    let digits = (n.abs() as u64).to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0.0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(yaml: &str) -> Value {
        Value::from_yaml(serde_norway::from_str(yaml).unwrap())
    }

    #[test]
    fn the_messages_are_helms() {
        let schema = parse(
            r#"{"type":"object","additionalProperties":false,"properties":{
                "a":{"type":["string","null"]},"e":{"enum":["A","B",3,null]},"one":{"enum":["Always"]},
                "n":{"type":"integer","minimum":0,"maximum":65535},"m":{"type":"object","additionalProperties":{"type":"string"}},
                "l":{"type":"array","items":{"type":"string"}}}}"#,
        )
        .unwrap();
        let got =
            validate(&schema, &v("{a: 1, e: C, one: Never, n: 70000, m: {x/y: 1, ok: s}, l: [s, 2], x: 1, y: 2}"));
        assert_eq!(
            got,
            [
                "at '': additional properties 'x', 'y' not allowed",
                "at '/a': got number, want null or string",
                "at '/e': value must be one of 'A', 'B', 3, <nil>",
                "at '/l/1': got number, want string",
                "at '/m/x~1y': got number, want string",
                "at '/n': maximum: got 70,000, want 65,535",
                "at '/one': value must be 'Always'",
            ]
        );
        assert_eq!(validate(&schema, &v("{n: -1}")), ["at '/n': minimum: got -1, want 0"]);
        assert_eq!(validate(&schema, &v("{n: 1.5}")), ["at '/n': got number, want integer"]);
        assert!(validate(&schema, &v("{n: 3, a: null, l: []}")).is_empty());
    }

    #[test]
    fn keywords_outside_the_subset_are_refused() {
        let err = parse(r#"{"properties":{"a":{"pattern":"^x$"}}}"#).unwrap_err();
        assert!(err.contains("'/properties/a'") && err.contains("\"pattern\" is not implemented"), "{err}");
        assert!(parse(r#"{"type":"text"}"#).unwrap_err().contains("a type name"));
    }
}
