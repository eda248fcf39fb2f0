//! Template values, with Helm's typing: numbers read from YAML files are float64 (Helm
//! reads values through JSON), numbers from `--set` are int64. Maps iterate in key
//! order, as Go templates range over maps and as sigs.k8s.io/yaml writes them.

use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Nil,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    Map(BTreeMap<String, Value>),
    /// `.Files`: only its `Get` method is offered.
    Files,
}

impl Value {
    /// Go's truth: false, 0, nil and empty strings, lists and maps are false.
    pub fn truthy(&self) -> bool {
        match self {
            Value::Nil => false,
            Value::Bool(b) => *b,
            Value::Int(i) => *i != 0,
            Value::Float(f) => *f != 0.0,
            Value::Str(s) => !s.is_empty(),
            Value::List(l) => !l.is_empty(),
            Value::Map(m) => !m.is_empty(),
            Value::Files => true,
        }
    }

    /// Go's type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Nil => "<nil>",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int64",
            Value::Float(_) => "float64",
            Value::Str(_) => "string",
            Value::List(_) => "[]interface {}",
            Value::Map(_) => "map[string]interface {}",
            Value::Files => "chart.Files",
        }
    }

    /// What `{{ . }}` prints: Go's `%v`. Nil prints nothing (Helm removes `<no value>`).
    pub fn print(&self) -> String {
        let mut out = String::new();
        self.print_into(&mut out, true);
        out
    }

    fn print_into(&self, out: &mut String, top: bool) {
        match self {
            Value::Nil if top => {}
            Value::Nil => out.push_str("<nil>"),
            Value::Bool(b) => write!(out, "{b}").unwrap(),
            Value::Int(i) => write!(out, "{i}").unwrap(),
            Value::Float(f) => out.push_str(&go_float(*f)),
            Value::Str(s) => out.push_str(s),
            Value::List(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    item.print_into(out, false);
                }
                out.push(']');
            }
            Value::Map(map) => {
                out.push_str("map[");
                for (i, (k, v)) in map.iter().enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    write!(out, "{k}:").unwrap();
                    v.print_into(out, false);
                }
                out.push(']');
            }
            Value::Files => out.push_str("{}"),
        }
    }

    /// A value read from YAML the way Helm reads values files and `fromYaml`: every
    /// number becomes a float64.
    pub fn from_yaml(yaml: serde_norway::Value) -> Value {
        match yaml {
            serde_norway::Value::Null => Value::Nil,
            serde_norway::Value::Bool(b) => Value::Bool(b),
            serde_norway::Value::Number(n) => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            serde_norway::Value::String(s) => Value::Str(s),
            serde_norway::Value::Sequence(items) => Value::List(items.into_iter().map(Value::from_yaml).collect()),
            serde_norway::Value::Mapping(map) => Value::Map(
                map.into_iter()
                    .map(|(k, v)| {
                        let key = match k {
                            serde_norway::Value::String(s) => s,
                            other => Value::from_yaml(other).print(),
                        };
                        (key, Value::from_yaml(v))
                    })
                    .collect(),
            ),
            serde_norway::Value::Tagged(tagged) => Value::from_yaml(tagged.value),
        }
    }

    /// YAML as sigs.k8s.io/yaml writes it: integral floats as integers, keys sorted.
    pub fn to_yaml(&self) -> serde_norway::Value {
        use serde_norway::Value as Y;
        match self {
            Value::Nil | Value::Files => Y::Null,
            Value::Bool(b) => Y::Bool(*b),
            Value::Int(i) => Y::from(*i),
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 => Y::from(*f as i64),
            Value::Float(f) => Y::from(*f),
            Value::Str(s) => Y::String(s.clone()),
            Value::List(items) => Y::Sequence(items.iter().map(Value::to_yaml).collect()),
            Value::Map(map) => Y::Mapping(map.iter().map(|(k, v)| (Y::String(k.clone()), v.to_yaml())).collect()),
        }
    }

    /// JSON as Go's encoding/json writes it: integral floats as integers, map keys
    /// sorted.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Nil | Value::Files => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 => J::from(*f as i64),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Str(s) => J::String(s.clone()),
            Value::List(items) => J::Array(items.iter().map(Value::to_json).collect()),
            Value::Map(map) => J::Object(map.iter().map(|(k, v)| (k.clone(), v.to_json())).collect()),
        }
    }
}

/// Spellings that Helm's YAML reader (YAML 1.1) takes as booleans when unquoted, and
/// as strings when quoted; serde_norway (YAML 1.2) takes them as strings either way.
const YAML11_BOOLS: &[&str] =
    &["y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF"];

/// The first string (key or value) in `yaml` that Helm may read differently: one of
/// YAML 1.1's boolean spellings. Refusing it beats rendering something else than Helm.
pub fn yaml11_ambiguity(yaml: &serde_norway::Value) -> Option<String> {
    match yaml {
        serde_norway::Value::String(s) if YAML11_BOOLS.contains(&s.as_str()) => Some(s.clone()),
        serde_norway::Value::Sequence(items) => items.iter().find_map(yaml11_ambiguity),
        serde_norway::Value::Mapping(map) => {
            map.iter().find_map(|(k, v)| yaml11_ambiguity(k).or_else(|| yaml11_ambiguity(v)))
        }
        serde_norway::Value::Tagged(t) => yaml11_ambiguity(&t.value),
        _ => None,
    }
}

/// The message for [`yaml11_ambiguity`].
pub fn yaml11_message(word: &str) -> String {
    format!(
        "{word:?} is a boolean in Helm's YAML 1.1 when unquoted and a string when quoted, and this renderer cannot tell which was meant: write true/false for a boolean, or set the string with --set-string"
    )
}

/// Go's `%v` of a float64: shortest digits, exponent form from 1e+06 (and below 1e-4).
pub fn go_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "+Inf".into() } else { "-Inf".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0".into() } else { "0".into() };
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("a decimal exponent");
    if !(-4..6).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        format!("{f}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_go_does() {
        for (f, want) in [
            (10.0, "10"),
            (0.5, "0.5"),
            (123456.0, "123456"),
            (1e6, "1e+06"),
            (1234567.0, "1.234567e+06"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-3.0, "-3"),
        ] {
            assert_eq!(go_float(f), want, "{f}");
        }
    }

    #[test]
    fn yaml_numbers_are_floats_and_print_like_helm() {
        let v = Value::from_yaml(serde_norway::from_str("{a: 1, b: [x, true], c: null}").unwrap());
        let Value::Map(m) = &v else { panic!() };
        assert_eq!(m["a"], Value::Float(1.0));
        assert_eq!(v.print(), "map[a:1 b:[x true] c:<nil>]");
        assert_eq!(serde_json::to_string(&v.to_json()).unwrap(), r#"{"a":1,"b":["x",true],"c":null}"#);
        assert!(!Value::Float(0.0).truthy() && !Value::Str(String::new()).truthy() && Value::Files.truthy());
    }
}
