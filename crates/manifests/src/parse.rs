//! Parser for the Go-template subset the chart uses (see `lib.rs`), over the items and
//! tokens of `lex.rs`: if/else if/else, with/else, range/else, define, variables,
//! pipelines, parenthesized pipelines, field chains on `.`, variables and parentheses,
//! string/number/bool/nil literals. Anything else is refused with its position, never
//! silently misread.

use crate::Error;
pub use crate::lex::Pos;
use crate::lex::{Item, Spanned, Tok, lex};
use crate::value::Value;

#[derive(Debug, Clone)]
pub enum Node {
    Text(String),
    Action(Pos, Pipeline),
    /// `if`, `else if`... branches, then the `else` body.
    If(Pos, Vec<(Pipeline, Vec<Node>)>, Vec<Node>),
    With(Pos, Pipeline, Vec<Node>, Vec<Node>),
    Range(Pos, Pipeline, Vec<Node>, Vec<Node>),
}

#[derive(Debug, Clone, Default)]
pub struct Pipeline {
    /// Variables declared (`:=`) or assigned (`=`) by the pipeline.
    pub vars: Vec<String>,
    pub assign: bool,
    pub cmds: Vec<Vec<Operand>>,
}

#[derive(Debug, Clone)]
pub enum Operand {
    /// `.` followed by zero or more fields: `.Values.cni`.
    Dot(Vec<String>),
    /// `$name` followed by fields (`$` alone is the template's data).
    Var(String, Vec<String>),
    Func(String),
    Lit(Value),
    Paren(Box<Pipeline>, Vec<String>),
}

/// A parsed file: its output nodes and the templates it defines.
pub struct Parsed {
    pub body: Vec<Node>,
    pub defines: Vec<(String, Vec<Node>)>,
}

pub fn parse(name: &str, src: &str) -> Result<Parsed, Error> {
    let items = lex(name, src)?;
    let mut p = Parser { name, items: items.into_iter().peekable(), defines: Vec::new() };
    let (body, end) = p.list()?;
    match end {
        Stop::Eof => Ok(Parsed { body, defines: p.defines }),
        Stop::End(pos) => Err(p.err(pos, "unexpected {{end}}")),
        Stop::Else(pos, _) => Err(p.err(pos, "unexpected {{else}}")),
    }
}

enum Stop {
    Eof,
    End(Pos),
    Else(Pos, Vec<Spanned>),
}

struct Parser<'a> {
    name: &'a str,
    items: std::iter::Peekable<std::vec::IntoIter<Item>>,
    defines: Vec<(String, Vec<Node>)>,
}

impl Parser<'_> {
    fn err(&self, pos: Pos, msg: &str) -> Error {
        Error::Parse(format!("{}:{}:{}: {msg}", self.name, pos.line, pos.col))
    }

    fn list(&mut self) -> Result<(Vec<Node>, Stop), Error> {
        let mut nodes = Vec::new();
        while let Some(item) = self.items.next() {
            let (pos, toks) = match item {
                Item::Text(t) => {
                    nodes.push(Node::Text(t));
                    continue;
                }
                Item::Action(pos, toks) => (pos, toks),
            };
            let keyword = match toks.first() {
                Some((Tok::Ident(k), _)) => k.as_str(),
                _ => "",
            };
            let rest = toks.get(1..).unwrap_or_default().to_vec();
            match keyword {
                "end" if rest.is_empty() => return Ok((nodes, Stop::End(pos))),
                "else" => return Ok((nodes, Stop::Else(pos, rest))),
                "if" => {
                    let mut branches = vec![(self.pipeline(pos, &rest)?, Vec::new())];
                    let otherwise = loop {
                        let (body, end) = self.list()?;
                        branches.last_mut().expect("one branch").1 = body;
                        match end {
                            Stop::End(_) => break Vec::new(),
                            Stop::Else(p, more) if matches!(more.first(), Some((Tok::Ident(k), _)) if k == "if") => {
                                branches.push((self.pipeline(p, &more[1..])?, Vec::new()));
                            }
                            Stop::Else(p, more) => break self.else_body(p, &more)?,
                            Stop::Eof => return Err(self.err(pos, "{{if}} without {{end}}")),
                        }
                    };
                    nodes.push(Node::If(pos, branches, otherwise));
                }
                "with" | "range" => {
                    let pipe = self.pipeline(pos, &rest)?;
                    let (body, end) = self.list()?;
                    let otherwise = match end {
                        Stop::End(_) => Vec::new(),
                        Stop::Else(p, more) => self.else_body(p, &more)?,
                        Stop::Eof => return Err(self.err(pos, &format!("{{{{{keyword}}}}} without {{{{end}}}}"))),
                    };
                    nodes.push(if keyword == "with" {
                        Node::With(pos, pipe, body, otherwise)
                    } else {
                        Node::Range(pos, pipe, body, otherwise)
                    });
                }
                "define" => {
                    let [(Tok::Lit(Value::Str(name)), _)] = rest.as_slice() else {
                        return Err(self.err(pos, "{{define}} takes one string: the template name"));
                    };
                    let (body, end) = self.list()?;
                    if !matches!(end, Stop::End(_)) {
                        return Err(self.err(pos, "{{define}} without {{end}}"));
                    }
                    self.defines.push((name.clone(), body));
                }
                "end" | "template" | "block" | "break" | "continue" => {
                    return Err(self.err(
                        pos,
                        &format!("{{{{{keyword}}}}} is outside the supported template subset (use include)"),
                    ));
                }
                _ => nodes.push(Node::Action(pos, self.pipeline(pos, &toks)?)),
            }
        }
        Ok((nodes, Stop::Eof))
    }

    fn else_body(&mut self, pos: Pos, more: &[Spanned]) -> Result<Vec<Node>, Error> {
        if !more.is_empty() {
            return Err(self.err(pos, "only {{else}} and {{else if}} are supported"));
        }
        match self.list()? {
            (body, Stop::End(_)) => Ok(body),
            _ => Err(self.err(pos, "{{else}} without {{end}}")),
        }
    }

    fn pipeline(&self, pos: Pos, toks: &[Spanned]) -> Result<Pipeline, Error> {
        let mut i = 0;
        let pipe = pipeline(toks, &mut i).map_err(|m| self.err(pos, &m))?;
        if i != toks.len() {
            return Err(self.err(pos, &format!("unexpected {:?}", toks[i].0)));
        }
        Ok(pipe)
    }
}

fn pipeline(toks: &[Spanned], i: &mut usize) -> Result<Pipeline, String> {
    let mut pipe = Pipeline::default();
    // `$a :=`, `$a =`, `$k, $v :=`
    let mut j = *i;
    let mut vars = Vec::new();
    while let Some((Tok::Var(v), _)) = toks.get(j) {
        vars.push(v.clone());
        j += 1;
        match toks.get(j).map(|t| &t.0) {
            Some(Tok::Comma) if vars.len() == 1 => j += 1,
            Some(Tok::Declare) | Some(Tok::Assign) => {
                pipe.assign = toks[j].0 == Tok::Assign;
                pipe.vars = std::mem::take(&mut vars);
                *i = j + 1;
                break;
            }
            _ => break,
        }
    }
    loop {
        let mut cmd = Vec::new();
        while let Some((tok, _)) = toks.get(*i) {
            if matches!(tok, Tok::Pipe | Tok::RParen) {
                break;
            }
            cmd.push(operand(toks, i)?);
        }
        if cmd.is_empty() {
            return Err("missing command in pipeline".into());
        }
        pipe.cmds.push(cmd);
        match toks.get(*i) {
            Some((Tok::Pipe, _)) => *i += 1,
            _ => return Ok(pipe),
        }
    }
}

fn operand(toks: &[Spanned], i: &mut usize) -> Result<Operand, String> {
    let (tok, _) = &toks[*i];
    *i += 1;
    let op = match tok {
        Tok::Dot => Operand::Dot(Vec::new()),
        Tok::Field(f) => Operand::Dot(vec![f.clone()]),
        Tok::Var(v) => Operand::Var(v.clone(), Vec::new()),
        Tok::Lit(v) => return Ok(Operand::Lit(v.clone())),
        Tok::Ident(id) => {
            return Ok(match id.as_str() {
                "true" => Operand::Lit(Value::Bool(true)),
                "false" => Operand::Lit(Value::Bool(false)),
                "nil" => Operand::Lit(Value::Nil),
                _ => Operand::Func(id.clone()),
            });
        }
        Tok::LParen => {
            let inner = pipeline(toks, i)?;
            match toks.get(*i) {
                Some((Tok::RParen, _)) => *i += 1,
                _ => return Err("unclosed (".into()),
            }
            Operand::Paren(Box::new(inner), Vec::new())
        }
        other => return Err(format!("unexpected {other:?}")),
    };
    let mut fields = Vec::new();
    while let Some((Tok::Field(f), false)) = toks.get(*i) {
        fields.push(f.clone());
        *i += 1;
    }
    Ok(match op {
        Operand::Dot(mut first) => {
            first.extend(fields);
            Operand::Dot(first)
        }
        Operand::Var(v, _) => Operand::Var(v, fields),
        Operand::Paren(p, _) => Operand::Paren(p, fields),
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_and_structures() {
        let p = parse("t", "a  {{- if .X }}\n b {{ else if $y }}c{{ else }}d{{ end -}}  \n e{{/* c */}}").unwrap();
        assert!(matches!(&p.body[0], Node::Text(t) if t == "a"));
        let Node::If(_, branches, otherwise) = &p.body[1] else { panic!("{:?}", p.body) };
        assert_eq!(branches.len(), 2);
        assert!(matches!(&otherwise[0], Node::Text(t) if t == "d"));
        assert!(matches!(&p.body[2], Node::Text(t) if t == "e"));
    }

    #[test]
    fn pipelines_declarations_and_fields() {
        let p = parse("t", r#"{{ $k, $v := .A.b }}{{ (include "x" .).y | nindent -4 }}{{ $x = "s\"" }}"#).unwrap();
        let Node::Action(_, pipe) = &p.body[0] else { panic!() };
        assert_eq!(pipe.vars, ["$k", "$v"]);
        assert!(matches!(&pipe.cmds[0][0], Operand::Dot(f) if f == &["A", "b"]));
        let Node::Action(_, pipe) = &p.body[1] else { panic!() };
        assert!(matches!(&pipe.cmds[0][0], Operand::Paren(_, f) if f == &["y"]));
        assert!(matches!(&pipe.cmds[1][1], Operand::Lit(Value::Int(-4))));
        let Node::Action(_, pipe) = &p.body[2] else { panic!() };
        assert!(pipe.assign);
    }

    #[test]
    fn unsupported_and_broken_input_is_refused_with_a_position() {
        for (src, want) in [
            ("{{ template \"x\" }}", "t:1:1: {{template}}"),
            ("x\n {{ if .A }}", "t:2:2: {{if}} without"),
            ("{{ .A ", "unclosed action"),
            ("{{ end }}", "unexpected {{end}}"),
        ] {
            let e = parse("t", src).err().unwrap().to_string();
            assert!(e.contains(want), "{src:?}: {e}");
        }
    }
}
