//! Helm's `--set` syntax (helm.sh/helm/v3/pkg/strvals): `a.b=c,d=e`, lists
//! `a={x,y}`, indexes `a[0].b=c`, backslash escapes (`a\.b=c`), and typing: true/false
//! (any case) are booleans, null is nil (removes the key), integers without a leading
//! zero are int64, everything else is a string. `--set-string` keeps every value a
//! string.

use std::collections::BTreeMap;

use crate::Error;
use crate::value::Value;

type Map = BTreeMap<String, Value>;

/// Helm refuses larger list indexes the same way.
const MAX_INDEX: usize = 65536;

/// Parses one `--set` argument into `dest`.
pub fn parse_into(arg: &str, dest: &mut Map, string_only: bool) -> Result<(), Error> {
    let mut p = Parser { chars: arg.chars().collect(), at: 0, string_only };
    let err = |msg: String| Error::Set(format!("{arg:?}: {msg}"));
    while p.at < p.chars.len() {
        p.key(dest).map_err(err)?;
    }
    Ok(())
}

struct Parser {
    chars: Vec<char>,
    at: usize,
    string_only: bool,
}

impl Parser {
    fn next(&mut self) -> Option<char> {
        let c = self.chars.get(self.at).copied();
        self.at += c.is_some() as usize;
        c
    }

    /// Runes up to (and consuming) the first unescaped stop rune, or to the end.
    fn until(&mut self, stops: &[char]) -> (String, Option<char>) {
        let mut out = String::new();
        while let Some(c) = self.next() {
            match c {
                '\\' => out.extend(self.next()),
                c if stops.contains(&c) => return (out, Some(c)),
                c => out.push(c),
            }
        }
        (out, None)
    }

    fn typed(&self, text: &str) -> Value {
        if self.string_only {
            return Value::Str(text.into());
        }
        if text.eq_ignore_ascii_case("true") {
            return Value::Bool(true);
        }
        if text.eq_ignore_ascii_case("false") {
            return Value::Bool(false);
        }
        if text.eq_ignore_ascii_case("null") {
            return Value::Nil;
        }
        if text == "0" {
            return Value::Int(0);
        }
        if !text.starts_with('0')
            && let Ok(i) = text.parse::<i64>()
        {
            return Value::Int(i);
        }
        Value::Str(text.into())
    }

    /// A value after `=`: a `{a,b}` list or a scalar up to the next `,`.
    fn value(&mut self) -> Result<Value, String> {
        if self.chars.get(self.at) != Some(&'{') {
            let (text, _) = self.until(&[',']);
            return Ok(self.typed(&text));
        }
        self.at += 1;
        let mut items = Vec::new();
        loop {
            let (text, stop) = self.until(&[',', '}']);
            match stop {
                Some(',') => items.push(self.typed(&text)),
                Some(_) => {
                    if !(text.is_empty() && items.is_empty()) {
                        items.push(self.typed(&text));
                    }
                    return match self.next() {
                        None | Some(',') => Ok(Value::List(items)),
                        Some(c) => Err(format!("unexpected {c:?} after a list")),
                    };
                }
                None => return Err("list must terminate with '}'".into()),
            }
        }
    }

    fn key(&mut self, data: &mut Map) -> Result<(), String> {
        let (key, stop) = self.until(&['=', '[', ',', '.']);
        match stop {
            None if key.is_empty() => Ok(()),
            None => Err(format!("key {key:?} has no value")),
            Some(',') => Err(format!("key {key:?} has no value (cannot end with ,)")),
            Some('=') => {
                let v = self.value()?;
                data.insert(key, v);
                Ok(())
            }
            Some('.') => {
                let mut inner = match data.remove(&key) {
                    Some(Value::Map(m)) => m,
                    _ => Map::new(),
                };
                let result = self.key(&mut inner);
                if result.is_ok() && inner.is_empty() {
                    return Err(format!("key map {key:?} has no value"));
                }
                data.insert(key, Value::Map(inner));
                result
            }
            Some(_) => {
                let index = self.index()?;
                let mut list = match data.remove(&key) {
                    Some(Value::List(l)) => l,
                    _ => Vec::new(),
                };
                let result = self.list_item(&mut list, index);
                data.insert(key, Value::List(list));
                result
            }
        }
    }

    fn index(&mut self) -> Result<usize, String> {
        let (text, stop) = self.until(&[']']);
        if stop.is_none() {
            return Err("missing ']'".into());
        }
        let i: usize = text.parse().map_err(|_| format!("invalid list index {text:?}"))?;
        if i > MAX_INDEX {
            return Err(format!("index of {i} is greater than maximum supported index of {MAX_INDEX}"));
        }
        Ok(i)
    }

    fn list_item(&mut self, list: &mut Vec<Value>, i: usize) -> Result<(), String> {
        if list.len() <= i {
            list.resize(i + 1, Value::Nil);
        }
        match self.next() {
            Some('=') => {
                list[i] = self.value()?;
                Ok(())
            }
            Some('.') => {
                let mut inner = match std::mem::replace(&mut list[i], Value::Nil) {
                    Value::Map(m) => m,
                    _ => Map::new(),
                };
                let result = self.key(&mut inner);
                list[i] = Value::Map(inner);
                result
            }
            Some('[') => {
                let j = self.index()?;
                let mut inner = match std::mem::replace(&mut list[i], Value::Nil) {
                    Value::List(l) => l,
                    _ => Vec::new(),
                };
                let result = self.list_item(&mut inner, j);
                list[i] = Value::List(inner);
                result
            }
            other => Err(format!("parse error: unexpected {other:?} after an index")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(args: &[&str]) -> Value {
        let mut m = Map::new();
        for a in args {
            parse_into(a, &mut m, false).unwrap();
        }
        Value::Map(m)
    }

    fn yaml(text: &str) -> Value {
        // Expected values, with --set's int64 typing for whole numbers.
        fn ints(v: Value) -> Value {
            match v {
                Value::Float(f) => Value::Int(f as i64),
                Value::List(l) => Value::List(l.into_iter().map(ints).collect()),
                Value::Map(m) => Value::Map(m.into_iter().map(|(k, v)| (k, ints(v))).collect()),
                v => v,
            }
        }
        ints(Value::from_yaml(serde_norway::from_str(text).unwrap()))
    }

    #[test]
    fn keys_lists_and_types_like_helm() {
        assert_eq!(set(&["a.b=c,d=1", "a.e=TRUE"]), yaml("{a: {b: c, e: true}, d: 1}"));
        assert_eq!(set(&["l={x,2,false}", "e={}"]), yaml("{l: [x, 2, false], e: []}"));
        assert_eq!(set(&["t[1].k=v", "n[0][1]=z"]), yaml("{t: [null, {k: v}], n: [[null, z]]}"));
        assert_eq!(
            set(&[r"a\.b=c\,d", "v=007", "f=1.5", "z=0", "n=null"]),
            yaml("{a.b: 'c,d', v: '007', f: '1.5', z: 0, n: null}")
        );
        let mut m = Map::new();
        parse_into("a=1,b=true", &mut m, true).unwrap();
        assert_eq!(Value::Map(m), Value::from_yaml(serde_norway::from_str("{a: '1', b: 'true'}").unwrap()));
    }

    #[test]
    fn malformed_arguments_are_refused() {
        for bad in ["a", "a,b=c", "l={x", "t[x]=1", "t[99999999]=1"] {
            assert!(parse_into(bad, &mut Map::new(), false).is_err(), "{bad}");
        }
    }
}
