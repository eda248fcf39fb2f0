//! `iptables-restore` input from rule sets, and `iptables-save` output read back:
//! which rules in a namespace are ours, which expected ones are missing, and the one
//! transaction that replaces or removes ours while leaving every other rule alone.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write;

use crate::rule::{CHAIN_PREFIX, COMMENT_PREFIX};
use crate::{RuleSet, TableRules};

/// Input for `iptables-restore --noflush` that creates our chains and rules, for a
/// namespace known to hold none of them.
pub fn install_payload(set: &RuleSet) -> String {
    let mut out = String::new();
    for t in &set.tables {
        writeln!(out, "*{}", t.table.as_str()).ok();
        declare(&mut out, &t.chains);
        for rule in &t.rules {
            writeln!(out, "{}", rule.restore_line()).ok();
        }
        out.push_str("COMMIT\n");
    }
    out
}

fn declare<'a>(out: &mut String, chains: impl IntoIterator<Item = &'a String>) {
    for chain in chains {
        // With --noflush, declaring a chain creates it, or empties it when it exists.
        writeln!(out, ":{chain} - [0:0]").ok();
    }
}

/// One table of `iptables-save` output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedTable {
    pub name: String,
    pub chains: Vec<String>,
    /// `(chain, line)` with `line` as saved: `-A CHAIN ...`, whitespace normalised.
    pub rules: Vec<(String, String)>,
}

/// Parsed `iptables-save` output of one family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Saved {
    pub tables: Vec<SavedTable>,
}

fn normalize(line: &str) -> String {
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Reads `iptables-save` output; lines it does not know are ignored.
pub fn parse_save(text: &str) -> Saved {
    let mut saved = Saved::default();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            saved.tables.push(SavedTable { name: name.to_owned(), ..Default::default() });
        } else if let Some(table) = saved.tables.last_mut() {
            if let Some(decl) = line.strip_prefix(':') {
                if let Some(chain) = decl.split_whitespace().next() {
                    table.chains.push(chain.to_owned());
                }
            } else if let Some(rest) = line.strip_prefix("-A ")
                && let Some(chain) = rest.split_whitespace().next()
            {
                table.rules.push((chain.to_owned(), normalize(line)));
            }
        }
    }
    saved
}

impl Saved {
    pub fn table(&self, name: &str) -> Option<&SavedTable> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// Whether any chain or rule of ours is present.
    pub fn has_ours(&self, expected: Option<&RuleSet>) -> bool {
        self.tables.iter().any(|t| {
            let ours = Ours::of(t, expected_table(expected, &t.name));
            !ours.chains.is_empty() || !ours.builtin_rules.is_empty()
        })
    }
}

fn expected_table<'a>(expected: Option<&'a RuleSet>, name: &str) -> Option<&'a TableRules> {
    expected?.tables.iter().find(|t| t.table.as_str() == name)
}

/// What in one saved table belongs to us.
struct Ours<'a> {
    /// Our chains (their rules go with them).
    chains: Vec<&'a str>,
    /// Our rules in chains we do not own, as saved.
    builtin_rules: Vec<(&'a str, &'a str)>,
}

impl<'a> Ours<'a> {
    /// A rule in a chain we do not own is ours when it carries our comment, jumps to one
    /// of our chains, or (comments being optional) is exactly one we generate.
    fn of(table: &'a SavedTable, expected: Option<&TableRules>) -> Self {
        let chains: Vec<&str> =
            table.chains.iter().map(String::as_str).filter(|c| c.starts_with(CHAIN_PREFIX)).collect();
        let expected: BTreeSet<String> =
            expected.map(|t| t.rules.iter().map(|r| r.saved_form()).collect()).unwrap_or_default();
        let comment = format!("--comment \"{COMMENT_PREFIX}");
        let builtin_rules = table
            .rules
            .iter()
            .filter(|(chain, _)| !chain.starts_with(CHAIN_PREFIX))
            .filter(|(_, line)| line.contains(&comment) || jumps_to_ours(line) || expected.contains(line))
            .map(|(chain, line)| (chain.as_str(), line.as_str()))
            .collect();
        Ours { chains, builtin_rules }
    }
}

fn jumps_to_ours(line: &str) -> bool {
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if (w == "-j" || w == "-g") && words.next().is_some_and(|t| t.starts_with(CHAIN_PREFIX)) {
            return true;
        }
    }
    false
}

/// One `iptables-restore --noflush` transaction that takes out every chain and rule of
/// ours found in `saved` and, when `new` is given, installs it. Rules of others are not
/// touched. `None` when there is nothing to do (nothing of ours and nothing to install).
///
/// `old` is the rule set believed to be installed, if known: it lets rules without our
/// comment (comments disabled) be recognised.
pub fn replace_payload(saved: &Saved, old: Option<&RuleSet>, new: Option<&RuleSet>) -> Option<String> {
    let mut names: Vec<&str> = saved.tables.iter().map(|t| t.name.as_str()).collect();
    if let Some(new) = new {
        for t in &new.tables {
            if !names.contains(&t.table.as_str()) {
                names.push(t.table.as_str());
            }
        }
    }
    let empty = SavedTable::default();
    let mut out = String::new();
    for name in names {
        let table = saved.table(name).unwrap_or(&empty);
        let ours = Ours::of(table, expected_table(old, name));
        let add = new.and_then(|n| n.tables.iter().find(|t| t.table.as_str() == name));
        if ours.chains.is_empty() && ours.builtin_rules.is_empty() && add.is_none() {
            continue;
        }
        writeln!(out, "*{name}").ok();
        let new_chains: Vec<&String> = add.map(|t| t.chains.iter().collect()).unwrap_or_default();
        // Empty every chain of ours first, so that no reference blocks a deletion.
        let mut to_declare: Vec<String> = ours.chains.iter().map(|c| c.to_string()).collect();
        for c in &new_chains {
            if !to_declare.contains(c) {
                to_declare.push((*c).clone());
            }
        }
        declare(&mut out, &to_declare);
        for (_, line) in &ours.builtin_rules {
            writeln!(out, "-D{}", &line[2..]).ok();
        }
        for chain in &ours.chains {
            if !new_chains.iter().any(|c| c == chain) {
                writeln!(out, "-X {chain}").ok();
            }
        }
        if let Some(add) = add {
            for rule in &add.rules {
                writeln!(out, "{}", rule.restore_line()).ok();
            }
        }
        out.push_str("COMMIT\n");
    }
    (!out.is_empty()).then_some(out)
}

/// The expected chains and rules that `saved` lacks, as `-t TABLE -N CHAIN` and
/// `-t TABLE -A CHAIN ...` lines. Each expected rule must be present as often as it is
/// expected.
pub fn missing(saved: &Saved, expected: &RuleSet) -> Vec<String> {
    let mut missing = Vec::new();
    for t in &expected.tables {
        let name = t.table.as_str();
        let table = saved.table(name);
        for chain in &t.chains {
            if !table.is_some_and(|s| s.chains.contains(chain)) {
                missing.push(format!("-t {name} -N {chain}"));
            }
        }
        let mut present: HashMap<&str, usize> = HashMap::new();
        for (_, line) in table.map(|s| s.rules.as_slice()).unwrap_or_default() {
            *present.entry(line.as_str()).or_default() += 1;
        }
        for rule in &t.rules {
            let line = rule.saved_form();
            match present.get_mut(line.as_str()) {
                Some(n) if *n > 0 => *n -= 1,
                _ => missing.push(format!("-t {name} {line}")),
            }
        }
    }
    missing
}
