//! Byte spans inside a JSON text, so that the installer edits a CNI configuration by
//! splicing text rather than re-serializing it: every byte of the user's file that we
//! do not own (formatting, key order, number spelling, escapes) stays exactly as it
//! was, and taking our entry out again restores the file byte for byte.
//!
//! Every function here expects text that serde_json has already accepted; on anything
//! else they return `None` rather than guess.

/// A half-open byte range `start..end` of the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn of(self, text: &str) -> &str {
        &text[self.start..self.end]
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && is_ws(b[i]) {
        i += 1;
    }
    i
}

/// The end of the string that opens at `i` (one past its closing quote).
fn string_end(b: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The end of the value that starts at `i`.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let mut j = i;
            while j < b.len() && !is_ws(b[j]) && !matches!(b[j], b',' | b']' | b'}') {
                j += 1;
            }
            Some(j)
        }
    }
}

/// The span of the value of member `key` of the top-level object. With duplicate keys,
/// the last one (the one serde_json keeps).
pub fn member(text: &str, key: &str) -> Option<Span> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    let mut found = None;
    while b.get(i) == Some(&b'"') {
        let key_end = string_end(b, i)?;
        let name: String = serde_json::from_str(&text[i..key_end]).ok()?;
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let start = skip_ws(b, i + 1);
        let end = value_end(b, start)?;
        if name == key {
            found = Some(Span { start, end });
        }
        i = skip_ws(b, end);
        if b.get(i) == Some(&b',') {
            i = skip_ws(b, i + 1);
        }
    }
    found
}

/// The spans of the elements of the array at `array`.
pub fn elements(text: &str, array: Span) -> Option<Vec<Span>> {
    let b = text.as_bytes();
    if b.get(array.start) != Some(&b'[') {
        return None;
    }
    let mut out = Vec::new();
    let mut i = skip_ws(b, array.start + 1);
    while i < array.end - 1 {
        let end = value_end(b, i)?;
        out.push(Span { start: i, end });
        i = skip_ws(b, end);
        if b.get(i) == Some(&b',') {
            i = skip_ws(b, i + 1);
        }
    }
    Some(out)
}

/// Indents every line after the first by `indent`. JSON strings cannot hold a raw line
/// break, so every `\n` of a JSON text is whitespace and [`dedent`] undoes this exactly.
pub fn indent(text: &str, indent: &str) -> String {
    text.replace('\n', &format!("\n{indent}"))
}

/// Undoes [`indent`]. On text indented otherwise it only changes whitespace outside
/// strings, so JSON stays JSON with the same content.
pub fn dedent(text: &str, indent: &str) -> String {
    text.replace(&format!("\n{indent}"), "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_members_and_elements_whatever_the_formatting() {
        let text = "{\"a\" :1,\"plugins\"\t:[ {\"type\":\"x\",\"s\":\"]}\\\"\"} ,\n\t[1,2],\"z\",3.0e5 ] }";
        let plugins = member(text, "plugins").unwrap();
        let els: Vec<&str> = elements(text, plugins).unwrap().iter().map(|s| s.of(text)).collect();
        assert_eq!(els, ["{\"type\":\"x\",\"s\":\"]}\\\"\"}", "[1,2]", "\"z\"", "3.0e5"]);
        assert_eq!(member(text, "a").unwrap().of(text), "1");
        assert_eq!(member(text, "missing"), None);
    }

    #[test]
    fn escaped_keys_and_duplicates_resolve_like_serde() {
        let text = r#"{"plugin\u0073": [1], "plugins": [2, 3]}"#;
        let span = member(text, "plugins").unwrap();
        assert_eq!(span.of(text), "[2, 3]");
        assert_eq!(elements(text, member(text, "plugins").unwrap()).unwrap().len(), 2);
    }

    #[test]
    fn empty_array_has_no_elements() {
        let text = "{\"plugins\": [ \n ]}";
        assert!(elements(text, member(text, "plugins").unwrap()).unwrap().is_empty());
    }

    #[test]
    fn indent_round_trips() {
        let text = "{\n  \"a\": [\n    1\n  ]\r\n}";
        assert_eq!(dedent(&indent(text, "    "), "    "), text);
    }
}
