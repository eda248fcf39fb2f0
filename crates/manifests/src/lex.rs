//! Lexer of the template subset: splits a file into text and actions (applying
//! `{{-`/`-}}` trimming and dropping comments), and an action into tokens.

use crate::Error;
use crate::value::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    Field(String),
    Dot,
    Var(String),
    Ident(String),
    Lit(Value),
    LParen,
    RParen,
    Pipe,
    Declare,
    Assign,
    Comma,
}

/// A token and whether whitespace came before it (fields must be adjacent).
pub type Spanned = (Tok, bool);

pub enum Item {
    Text(String),
    Action(Pos, Vec<Spanned>),
}

fn position(src: &str, offset: usize) -> Pos {
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let col = offset - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    Pos { line, col }
}

pub fn lex(name: &str, src: &str) -> Result<Vec<Item>, Error> {
    let err = |offset: usize, msg: &str| {
        let pos = position(src, offset);
        Error::Parse(format!("{name}:{}:{}: {msg}", pos.line, pos.col))
    };
    let mut items = Vec::new();
    let mut rest = 0;
    let mut trim_next = false;
    while rest < src.len() {
        let Some(open) = src[rest..].find("{{").map(|i| i + rest) else {
            push_text(&mut items, &src[rest..], trim_next);
            break;
        };
        let mut i = open + 2;
        let bytes = src.as_bytes();
        let trim_left = bytes.get(i) == Some(&b'-') && bytes.get(i + 1).is_some_and(u8::is_ascii_whitespace);
        let mut text = &src[rest..open];
        if trim_left {
            text = text.trim_end();
            i += 2;
        }
        push_text(&mut items, text, trim_next);
        let pos = position(src, open);
        while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        if src[i..].starts_with("/*") {
            let end = src[i..].find("*/").ok_or_else(|| err(open, "unclosed comment"))? + i + 2;
            let close = src[end..].trim_start();
            let (trim, after) = match close.strip_prefix("-}}") {
                Some(after) => (true, after),
                None => (false, close.strip_prefix("}}").ok_or_else(|| err(open, "comment must end with */}}"))?),
            };
            trim_next = trim;
            rest = src.len() - after.len();
            continue;
        }
        let (toks, end, trim) = lex_action(src, i).map_err(|(o, m)| err(o, &m))?;
        items.push(Item::Action(pos, toks));
        trim_next = trim;
        rest = end;
    }
    Ok(items)
}

fn push_text(items: &mut Vec<Item>, text: &str, trim_start: bool) {
    let text = if trim_start { text.trim_start() } else { text };
    if !text.is_empty() {
        items.push(Item::Text(text.to_owned()));
    }
}

/// Tokens of one action from `start` to its `}}`: (tokens, offset after `}}`, `-}}`).
fn lex_action(src: &str, start: usize) -> Result<(Vec<Spanned>, usize, bool), (usize, String)> {
    let b = src.as_bytes();
    let mut i = start;
    let mut toks = Vec::new();
    let mut spaced = true;
    let ident_end = |mut j: usize| {
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
            j += 1;
        }
        j
    };
    loop {
        let Some(&c) = b.get(i) else { return Err((start, "unclosed action".into())) };
        match c {
            b' ' | b'\t' | b'\r' | b'\n' => {
                i += 1;
                spaced = true;
                continue;
            }
            b'-' if spaced && src[i..].starts_with("-}}") => return Ok((toks, i + 3, true)),
            b'}' if src[i..].starts_with("}}") => return Ok((toks, i + 2, false)),
            b'.' => {
                let end = ident_end(i + 1);
                toks.push((if end == i + 1 { Tok::Dot } else { Tok::Field(src[i + 1..end].into()) }, spaced));
                i = end;
            }
            b'$' => {
                let end = ident_end(i + 1);
                toks.push((Tok::Var(src[i..end].into()), spaced));
                i = end;
            }
            b'(' | b')' | b'|' | b',' | b'=' => {
                toks.push((
                    match c {
                        b'(' => Tok::LParen,
                        b')' => Tok::RParen,
                        b'|' => Tok::Pipe,
                        b',' => Tok::Comma,
                        _ => Tok::Assign,
                    },
                    spaced,
                ));
                i += 1;
            }
            b':' if b.get(i + 1) == Some(&b'=') => {
                toks.push((Tok::Declare, spaced));
                i += 2;
            }
            b'"' | b'`' => {
                let (s, end) = lex_string(src, i).ok_or((i, "unterminated string".to_string()))?;
                toks.push((Tok::Lit(Value::Str(s)), spaced));
                i = end;
            }
            b'0'..=b'9' | b'-' | b'+' => {
                let mut end = i + 1;
                while end < b.len()
                    && (b[end].is_ascii_alphanumeric()
                        || b[end] == b'.'
                        || ((b[end] == b'-' || b[end] == b'+') && matches!(b[end - 1], b'e' | b'E')))
                {
                    end += 1;
                }
                let text = &src[i..end];
                let lit = match text.parse::<i64>() {
                    Ok(n) => Value::Int(n),
                    Err(_) => Value::Float(text.parse::<f64>().map_err(|_| (i, format!("bad number {text:?}")))?),
                };
                toks.push((Tok::Lit(lit), spaced));
                i = end;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let end = ident_end(i);
                toks.push((Tok::Ident(src[i..end].into()), spaced));
                i = end;
            }
            _ => return Err((i, format!("unexpected {:?} in action", src[i..].chars().next().unwrap_or('?')))),
        }
        spaced = false;
    }
}

/// A Go string literal at `start` (interpreted "..." or raw `...`): (value, end offset).
fn lex_string(src: &str, start: usize) -> Option<(String, usize)> {
    if src[start..].starts_with('`') {
        let end = src[start + 1..].find('`')? + start + 1;
        return Some((src[start + 1..end].to_owned(), end + 1));
    }
    let mut out = String::new();
    let mut chars = src[start + 1..].char_indices();
    while let Some((j, c)) = chars.next() {
        match c {
            '"' => return Some((out, start + 1 + j + 1)),
            '\n' => return None,
            '\\' => {
                let (_, e) = chars.next()?;
                match e {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'r' => out.push('\r'),
                    '\\' | '"' | '\'' => out.push(e),
                    'x' | 'u' | 'U' => {
                        let len = match e {
                            'x' => 2,
                            'u' => 4,
                            _ => 8,
                        };
                        let hex: String = (0..len).filter_map(|_| chars.next().map(|(_, h)| h)).collect();
                        out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                    }
                    _ => return None,
                }
            }
            c => out.push(c),
        }
    }
    None
}
