//! The functions of the subset, with the behaviour of Go's text/template built-ins and
//! of Helm's/sprig's versions: default, quote, toYaml, toJson, fromYaml, nindent,
//! indent, required, fail, eq, ne, and/or (in exec.rs), not, list, printf, trimSuffix,
//! join, sha256sum, include (in exec.rs).

use std::fmt::Write as _;

use crate::value::Value;

pub enum FuncError {
    /// `fail` and `required`: the chart's own message, shown as is.
    Fail(String),
    Call(String),
}

type Result<T> = std::result::Result<T, FuncError>;

fn bad(msg: impl Into<String>) -> FuncError {
    FuncError::Call(msg.into())
}

fn arity(name: &str, args: &[Value], n: usize) -> Result<()> {
    if args.len() != n {
        return Err(bad(format!("wrong number of args for {name}: want {n} got {}", args.len())));
    }
    Ok(())
}

fn string(v: &Value) -> Result<&str> {
    match v {
        Value::Str(s) => Ok(s),
        Value::Nil => Err(bad("invalid value; expected string")),
        other => Err(bad(format!("wrong type for value; expected string; got {}", other.type_name()))),
    }
}

fn int(v: &Value) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        other => Err(bad(format!("wrong type for value; expected int; got {}", other.type_name()))),
    }
}

pub fn call(name: &str, args: Vec<Value>) -> Result<Value> {
    let s = |v: String| Ok(Value::Str(v));
    match name {
        "default" => match args.as_slice() {
            [d] => Ok(d.clone()),
            [d, given, ..] => Ok(if given.truthy() { given.clone() } else { d.clone() }),
            [] => Err(bad("wrong number of args for default: want at least 1 got 0")),
        },
        "quote" => {
            s(args.iter().filter(|a| **a != Value::Nil).map(|a| go_quote(&a.print())).collect::<Vec<_>>().join(" "))
        }
        "toYaml" => {
            arity(name, &args, 1)?;
            let yaml = serde_norway::to_string(&args[0].to_yaml()).unwrap_or_default();
            s(yaml.strip_suffix('\n').unwrap_or(&yaml).to_owned())
        }
        "toJson" => {
            arity(name, &args, 1)?;
            s(go_json(&args[0]))
        }
        "fromYaml" => {
            arity(name, &args, 1)?;
            let text = string(&args[0])?;
            if let Some(word) = serde_norway::from_str(text).ok().as_ref().and_then(crate::value::yaml11_ambiguity) {
                return Err(bad(crate::value::yaml11_message(&word)));
            }
            Ok(from_yaml(text))
        }
        "indent" | "nindent" => {
            arity(name, &args, 2)?;
            let pad = " ".repeat(usize::try_from(int(&args[0])?).unwrap_or(0));
            let text = format!("{pad}{}", string(&args[1])?.replace('\n', &format!("\n{pad}")));
            s(if name == "nindent" { format!("\n{text}") } else { text })
        }
        "required" => {
            arity(name, &args, 2)?;
            match &args[1] {
                Value::Nil => Err(FuncError::Fail(string(&args[0])?.to_owned())),
                Value::Str(v) if v.is_empty() => Err(FuncError::Fail(string(&args[0])?.to_owned())),
                v => Ok(v.clone()),
            }
        }
        "fail" => {
            arity(name, &args, 1)?;
            Err(FuncError::Fail(string(&args[0])?.to_owned()))
        }
        "eq" | "ne" => {
            if args.len() < 2 {
                return Err(bad(format!("wrong number of args for {name}: want at least 2 got {}", args.len())));
            }
            if name == "ne" && args.len() != 2 {
                return Err(bad("wrong number of args for ne: want 2"));
            }
            let mut any = false;
            for other in &args[1..] {
                any |= go_eq(&args[0], other)?;
            }
            Ok(Value::Bool(if name == "eq" { any } else { !any }))
        }
        "not" => {
            arity(name, &args, 1)?;
            Ok(Value::Bool(!args[0].truthy()))
        }
        "list" => Ok(Value::List(args)),
        "printf" => {
            let Some((format, rest)) = args.split_first() else { return Err(bad("wrong number of args for printf")) };
            s(printf(string(format)?, rest))
        }
        "trimSuffix" => {
            arity(name, &args, 2)?;
            let (suffix, text) = (string(&args[0])?, string(&args[1])?);
            s(text.strip_suffix(suffix).unwrap_or(text).to_owned())
        }
        "join" => {
            arity(name, &args, 2)?;
            let Value::List(items) = &args[1] else { return Err(bad("join: the second argument must be a list")) };
            s(items.iter().map(Value::print).collect::<Vec<_>>().join(string(&args[0])?))
        }
        "sha256sum" => {
            arity(name, &args, 1)?;
            let digest = ring::digest::digest(&ring::digest::SHA256, string(&args[0])?.as_bytes());
            s(digest.as_ref().iter().fold(String::new(), |mut hex, b| {
                write!(hex, "{b:02x}").unwrap();
                hex
            }))
        }
        _ => Err(bad(format!("function {name:?} is not in the supported template subset"))),
    }
}

/// Go's eq on basic kinds; a nil on either side is simply unequal.
fn go_eq(a: &Value, b: &Value) -> Result<bool> {
    Ok(match (a, b) {
        (Value::Nil, Value::Nil) => true,
        (Value::Nil, _) | (_, Value::Nil) => false,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Int(x), Value::Int(y)) => x == y,
        (Value::Float(x), Value::Float(y)) => x == y,
        (Value::Str(x), Value::Str(y)) => x == y,
        (Value::List(_) | Value::Map(_) | Value::Files, _) | (_, Value::List(_) | Value::Map(_) | Value::Files) => {
            return Err(bad("non-comparable types"));
        }
        _ => return Err(bad("incompatible types for comparison")),
    })
}

/// Helm's fromYaml: a map, or {"Error": message} when the text is not one.
fn from_yaml(text: &str) -> Value {
    match serde_norway::from_str::<serde_norway::Value>(text) {
        Ok(serde_norway::Value::Null) => Value::Map(Default::default()),
        Ok(v @ serde_norway::Value::Mapping(_)) => Value::from_yaml(v),
        Ok(_) => Value::Map(
            [("Error".to_string(), Value::Str("cannot unmarshal a non-map into map[string]interface {}".into()))]
                .into(),
        ),
        Err(e) => Value::Map([("Error".to_string(), Value::Str(e.to_string()))].into()),
    }
}

/// encoding/json's output: compact, sorted keys, HTML characters escaped.
pub fn go_json(v: &Value) -> String {
    let json = serde_json::to_string(&v.to_json()).unwrap_or_default();
    json.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

/// Go's `%q` of a string (strconv.Quote).
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => write!(out, "\\x{:02x}", c as u32).unwrap(),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// fmt.Sprintf for the verbs %s, %d, %v, %q and %%; a verb that does not fit its
/// argument prints as Go prints it (`%!d(string=x)`).
fn printf(format: &str, args: &[Value]) -> String {
    let mut out = String::new();
    let mut args = args.iter();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(verb) = chars.next() else {
            out.push_str("%!(NOVERB)");
            break;
        };
        if verb == '%' {
            out.push('%');
            continue;
        }
        let Some(arg) = args.next() else {
            write!(out, "%!{verb}(MISSING)").unwrap();
            continue;
        };
        match (verb, arg) {
            ('v', v) => out.push_str(&go_value(v)),
            ('s', Value::Str(s)) => out.push_str(s),
            ('q', Value::Str(s)) => out.push_str(&go_quote(s)),
            ('d', Value::Int(i)) => write!(out, "{i}").unwrap(),
            (_, Value::Nil) => write!(out, "%!{verb}(<nil>)").unwrap(),
            (_, v) => write!(out, "%!{verb}({}={})", v.type_name(), go_value(v)).unwrap(),
        }
    }
    let extra: Vec<String> = args.map(|a| format!("{}={}", a.type_name(), go_value(a))).collect();
    if !extra.is_empty() {
        write!(out, "%!(EXTRA {})", extra.join(", ")).unwrap();
    }
    out
}

/// `%v` of a value inside printf (nil shows as `<nil>` there).
fn go_value(v: &Value) -> String {
    match v {
        Value::Nil => "<nil>".into(),
        v => v.print(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call_ok(name: &str, args: Vec<Value>) -> Value {
        call(name, args).unwrap_or_else(|_| panic!("{name} failed"))
    }
    fn st(s: &str) -> Value {
        Value::Str(s.into())
    }

    #[test]
    fn sprig_behaviour() {
        assert_eq!(call_ok("default", vec![st("d"), st("")]), st("d"));
        assert_eq!(call_ok("default", vec![st("d"), Value::Bool(false)]), st("d"));
        assert_eq!(call_ok("default", vec![st("d"), st("x")]), st("x"));
        assert_eq!(call_ok("quote", vec![Value::Bool(true), Value::Nil, Value::Float(10.0)]), st(r#""true" "10""#));
        assert_eq!(call_ok("nindent", vec![Value::Int(2), st("a\nb")]), st("\n  a\n  b"));
        assert_eq!(call_ok("indent", vec![Value::Int(2), st("a")]), st("  a"));
        assert_eq!(call_ok("trimSuffix", vec![st(".conf"), st("x.conf")]), st("x"));
        assert_eq!(
            call_ok("toJson", vec![Value::List(vec![st("<a>"), Value::Float(2.0)])]),
            st(r#"["\u003ca\u003e",2]"#)
        );
        assert_eq!(
            call_ok("toYaml", vec![Value::Map([("b".into(), Value::Int(1)), ("a".into(), st("x"))].into())]),
            st("a: x\nb: 1")
        );
        assert_eq!(
            call_ok("printf", vec![st("%s/%s:%v %q %d"), st("a"), st("b"), Value::Float(1.0), st("q"), st("x")]),
            st(r#"a/b:1 "q" %!d(string=x)"#)
        );
        assert_eq!(
            call_ok("sha256sum", vec![st("")]),
            st("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        );
    }

    #[test]
    fn comparisons_follow_go() {
        assert_eq!(call_ok("eq", vec![st("a"), st("b"), st("a")]), Value::Bool(true));
        assert_eq!(call_ok("ne", vec![Value::Nil, st("a")]), Value::Bool(true));
        assert!(call("eq", vec![Value::Int(1), Value::Float(1.0)]).is_err());
        assert!(matches!(call("required", vec![st("need x"), st("")]), Err(FuncError::Fail(m)) if m == "need x"));
        assert!(matches!(call("fail", vec![st("no")]), Err(FuncError::Fail(m)) if m == "no"));
        assert!(matches!(call("lower", vec![]), Err(FuncError::Call(_))));
    }

    #[test]
    fn from_yaml_is_a_map_or_an_error_entry() {
        let Value::Map(m) = from_yaml("a: [1]") else { panic!() };
        assert_eq!(m["a"], Value::List(vec![Value::Float(1.0)]));
        let Value::Map(m) = from_yaml("- x") else { panic!() };
        assert!(m.contains_key("Error"));
    }
}
