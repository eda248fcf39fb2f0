//! Executes parsed templates as Go's text/template does under Helm: missing map keys
//! are nil (printed as nothing), a field of nil is an error, variables are scoped to
//! the control structure that declares them, `and`/`or` stop at the deciding argument,
//! and `include` renders a defined template into a string.

use std::collections::{BTreeMap, HashMap};

use crate::Error;
use crate::funcs;
use crate::parse::{Node, Operand, Pipeline, Pos};
use crate::value::Value;

/// A template defined with `{{ define }}`, and the file it came from (for errors).
pub struct Define {
    pub file: String,
    pub body: Vec<Node>,
}

pub struct Exec<'a> {
    pub defines: &'a HashMap<String, Define>,
    pub files: &'a BTreeMap<String, String>,
}

type Vars = Vec<(String, Value)>;

/// Helm stops runaway recursion of include the same way.
const MAX_INCLUDE_DEPTH: usize = 1000;

impl Exec<'_> {
    /// Renders `nodes` (from file `file`) with `data` as both `.` and `$`.
    pub fn run(&self, file: &str, nodes: &[Node], data: &Value) -> Result<String, Error> {
        self.run_at(file, nodes, data, 0)
    }

    fn run_at(&self, file: &str, nodes: &[Node], data: &Value, depth: usize) -> Result<String, Error> {
        let mut vars = vec![("$".to_string(), data.clone())];
        let mut out = String::new();
        let ctx = Ctx { exec: self, file, depth };
        ctx.walk(nodes, data, &mut vars, &mut out)?;
        Ok(out)
    }
}

struct Ctx<'a> {
    exec: &'a Exec<'a>,
    file: &'a str,
    depth: usize,
}

impl Ctx<'_> {
    fn fail(&self, pos: Pos, msg: String) -> Error {
        Error::Exec { at: format!("{}:{}:{}", self.file, pos.line, pos.col), msg }
    }

    fn walk(&self, nodes: &[Node], dot: &Value, vars: &mut Vars, out: &mut String) -> Result<(), Error> {
        for node in nodes {
            match node {
                Node::Text(t) => out.push_str(t),
                Node::Action(pos, pipe) => {
                    let v = self.pipe(*pos, pipe, dot, vars, true)?;
                    if pipe.vars.is_empty() {
                        out.push_str(&v.print());
                    }
                }
                Node::If(pos, branches, otherwise) => {
                    let mark = vars.len();
                    let mut taken = false;
                    for (cond, body) in branches {
                        if self.pipe(*pos, cond, dot, vars, true)?.truthy() {
                            self.walk(body, dot, vars, out)?;
                            taken = true;
                            break;
                        }
                    }
                    if !taken {
                        self.walk(otherwise, dot, vars, out)?;
                    }
                    vars.truncate(mark);
                }
                Node::With(pos, pipe, body, otherwise) => {
                    let mark = vars.len();
                    let v = self.pipe(*pos, pipe, dot, vars, true)?;
                    if v.truthy() {
                        self.walk(body, &v, vars, out)?;
                    } else {
                        self.walk(otherwise, dot, vars, out)?;
                    }
                    vars.truncate(mark);
                }
                Node::Range(pos, pipe, body, otherwise) => {
                    let v = self.pipe(*pos, pipe, dot, vars, false)?;
                    let items: Vec<(Value, Value)> = match v {
                        Value::List(items) => {
                            items.into_iter().enumerate().map(|(i, v)| (Value::Int(i as i64), v)).collect()
                        }
                        Value::Map(map) => map.into_iter().map(|(k, v)| (Value::Str(k), v)).collect(),
                        Value::Nil => Vec::new(),
                        other => return Err(self.fail(*pos, format!("range can't iterate over {}", other.print()))),
                    };
                    if items.is_empty() {
                        self.walk(otherwise, dot, vars, out)?;
                    }
                    for (key, item) in items {
                        let mark = vars.len();
                        match pipe.vars.as_slice() {
                            [] => {}
                            [v] => vars.push((v.clone(), item.clone())),
                            [k, v, ..] => {
                                vars.push((k.clone(), key));
                                vars.push((v.clone(), item.clone()));
                            }
                        }
                        self.walk(body, &item, vars, out)?;
                        vars.truncate(mark);
                    }
                }
            }
        }
        Ok(())
    }

    /// Evaluates a pipeline; with `bind`, declares or assigns its variables.
    fn pipe(&self, pos: Pos, pipe: &Pipeline, dot: &Value, vars: &mut Vars, bind: bool) -> Result<Value, Error> {
        let mut piped = None;
        for cmd in &pipe.cmds {
            piped = Some(self.cmd(pos, cmd, piped, dot, vars)?);
        }
        let value = piped.unwrap_or(Value::Nil);
        if bind {
            for name in &pipe.vars {
                if pipe.assign {
                    let slot = vars
                        .iter_mut()
                        .rev()
                        .find(|(n, _)| n == name)
                        .ok_or_else(|| self.fail(pos, format!("undefined variable: {name}")))?;
                    slot.1 = value.clone();
                } else {
                    vars.push((name.clone(), value.clone()));
                }
            }
        }
        Ok(value)
    }

    fn cmd(
        &self,
        pos: Pos,
        cmd: &[Operand],
        piped: Option<Value>,
        dot: &Value,
        vars: &mut Vars,
    ) -> Result<Value, Error> {
        let first = &cmd[0];
        let args = &cmd[1..];
        let Operand::Func(name) = first else {
            // `.Files.Get "path"`: the one method call the subset has.
            if let Operand::Dot(fields) | Operand::Var(_, fields) = first
                && fields.last().is_some_and(|f| f == "Get")
                && !args.is_empty()
            {
                let receiver = match first {
                    Operand::Dot(f) => self.fields(pos, dot.clone(), &f[..f.len() - 1])?,
                    Operand::Var(v, f) => self.fields(pos, self.var(pos, v, vars)?, &f[..f.len() - 1])?,
                    _ => unreachable!(),
                };
                if receiver == Value::Files {
                    let mut values = self.args(pos, args, dot, vars)?;
                    values.extend(piped);
                    return match values.as_slice() {
                        [Value::Str(path)] => Ok(Value::Str(self.exec.files.get(path).cloned().unwrap_or_default())),
                        _ => Err(self.fail(pos, "Files.Get takes one string".into())),
                    };
                }
            }
            if !args.is_empty() || piped.is_some() {
                return Err(self.fail(pos, format!("can't give argument to non-function {first:?}")));
            }
            return self.operand(pos, first, dot, vars);
        };
        match name.as_str() {
            // Go 1.18+: evaluate only up to the deciding argument.
            "and" | "or" => {
                let want = name == "or";
                if args.is_empty() && piped.is_none() {
                    return Err(self.fail(pos, format!("wrong number of args for {name}: want at least 1 got 0")));
                }
                let mut last = Value::Nil;
                for arg in args {
                    last = self.operand(pos, arg, dot, vars)?;
                    if last.truthy() == want {
                        return Ok(last);
                    }
                }
                Ok(piped.unwrap_or(last))
            }
            "include" => {
                let mut values = self.args(pos, args, dot, vars)?;
                values.extend(piped);
                let [Value::Str(template), data] = values.as_slice() else {
                    return Err(self.fail(pos, "include takes a template name and its data".into()));
                };
                let define = self.exec.defines.get(template).ok_or_else(|| {
                    self.fail(pos, format!("no template {template:?} associated with template \"gotpl\""))
                })?;
                if self.depth >= MAX_INCLUDE_DEPTH {
                    return Err(self.fail(pos, format!("rendering template has a nested reference name: {template}")));
                }
                Ok(Value::Str(self.exec.run_at(&define.file, &define.body, data, self.depth + 1)?))
            }
            _ => {
                let mut values = self.args(pos, args, dot, vars)?;
                values.extend(piped);
                funcs::call(name, values).map_err(|e| match e {
                    funcs::FuncError::Fail(msg) => self.fail(pos, msg),
                    funcs::FuncError::Call(msg) => self.fail(pos, format!("error calling {name}: {msg}")),
                })
            }
        }
    }

    fn args(&self, pos: Pos, args: &[Operand], dot: &Value, vars: &mut Vars) -> Result<Vec<Value>, Error> {
        args.iter().map(|a| self.operand(pos, a, dot, vars)).collect()
    }

    fn operand(&self, pos: Pos, op: &Operand, dot: &Value, vars: &mut Vars) -> Result<Value, Error> {
        match op {
            Operand::Dot(fields) => self.fields(pos, dot.clone(), fields),
            Operand::Var(name, fields) => self.fields(pos, self.var(pos, name, vars)?, fields),
            Operand::Lit(v) => Ok(v.clone()),
            Operand::Paren(pipe, fields) => {
                let v = self.pipe(pos, pipe, dot, vars, true)?;
                self.fields(pos, v, fields)
            }
            // A function as an argument is called without arguments: `(list)`, `list`.
            Operand::Func(_) => self.cmd(pos, std::slice::from_ref(op), None, dot, vars),
        }
    }

    fn var(&self, pos: Pos, name: &str, vars: &Vars) -> Result<Value, Error> {
        vars.iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| self.fail(pos, format!("undefined variable: {name}")))
    }

    fn fields(&self, pos: Pos, mut v: Value, fields: &[String]) -> Result<Value, Error> {
        for field in fields {
            v = match v {
                Value::Map(mut map) => map.remove(field).unwrap_or(Value::Nil),
                Value::Nil => return Err(self.fail(pos, format!("nil pointer evaluating interface {{}}.{field}"))),
                other => {
                    return Err(self.fail(pos, format!("can't evaluate field {field} in type {}", other.type_name())));
                }
            };
        }
        Ok(v)
    }
}
