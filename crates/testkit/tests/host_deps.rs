//! What the project needs from the host stays written down in one place: every program
//! the sources run is in `scripts/host-programs.txt`, and each Debian one there comes
//! from a package `scripts/host-deps.sh` installs. A program added to the code and not
//! to the list, or listed under a package the script does not install, fails here by
//! name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::repo_root;

/// program -> package (or `toolchain`), from scripts/host-programs.txt.
fn listed() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(repo_root().join("scripts/host-programs.txt")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let mut words = l.split_whitespace();
            let (program, package) = (words.next().unwrap(), words.next());
            let package = package.unwrap_or_else(|| panic!("host-programs.txt: {program} names no package"));
            (program.to_string(), package.to_string())
        })
        .collect()
}

fn installed_by_script() -> BTreeSet<String> {
    let out = Command::new("bash").arg(repo_root().join("scripts/host-deps.sh")).arg("--list").output().unwrap();
    assert!(out.status.success(), "host-deps.sh --list: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect()
}

/// The Debian package owning `path`, following its symlinks one step at a time (the
/// package may own the link, e.g. /usr/bin/clang, or only its target, e.g. the
/// alternatives behind /usr/sbin/iptables), with and without the /usr prefix (dpkg
/// records /bin/kill, usrmerge serves it at /usr/bin/kill).
fn owner(path: &Path) -> Option<String> {
    let mut path = path.to_path_buf();
    for _ in 0..8 {
        let stripped = path.strip_prefix("/usr").map(|p| Path::new("/").join(p)).ok();
        for candidate in std::iter::once(path.clone()).chain(stripped) {
            let out = Command::new("dpkg").arg("-S").arg(&candidate).output().ok()?;
            let text = String::from_utf8_lossy(&out.stdout);
            // "diversion by dash from: /bin/sh" lines are not owners.
            let owner = text.lines().filter(|l| !l.starts_with("diversion ")).find_map(|l| l.split_once(": "));
            if let Some((pkg, _)) = owner.filter(|_| out.status.success()) {
                return Some(pkg.split(':').next().unwrap_or(pkg).to_string());
            }
        }
        let target = std::fs::read_link(&path).ok()?;
        path = path.parent().unwrap_or(Path::new("/")).join(target);
    }
    None
}

/// Where Debian installs programs: a user's PATH (pyenv, rustup, /usr/local/go) is not
/// what a fresh machine has.
fn debian_path(program: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"].iter().map(|d| Path::new(d).join(program)).find(|p| p.exists())
}

#[test]
fn every_listed_program_comes_from_a_package_host_deps_installs() {
    let packages = installed_by_script();
    let mut wrong = Vec::new();
    for (program, package) in listed() {
        if package == "toolchain" {
            continue;
        }
        if !packages.contains(&package) {
            wrong.push(format!("{program}: its package {package} is not in scripts/host-deps.sh"));
            continue;
        }
        let Some(path) = debian_path(&program) else {
            wrong.push(format!("{program}: not installed (run scripts/host-deps.sh)"));
            continue;
        };
        match owner(&path) {
            Some(found) if found == package => {}
            Some(found) => wrong.push(format!("{program}: {} belongs to {found}, listed as {package}", path.display())),
            None => wrong.push(format!("{program}: no package owns {}", path.display())),
        }
    }
    assert!(wrong.is_empty(), "scripts/host-programs.txt is wrong:\n{}", wrong.join("\n"));
}

/// Where our Rust code names a program to run by a literal: `Command::new`, and our
/// helpers whose first argument is a program (testkit's `sh` and `NamedNetns::exec`,
/// the installer harness's `start_program`). Programs named by a computed string
/// (`{front}-save`, the netfilter backends' tools, build.rs's `$CLANG`) are listed by
/// hand.
const RUST_RUNNERS: [&str; 4] = ["Command::new(\"", " sh(\"", ".exec(\"", "start_program(Path::new(\""];
/// The real node's own `run(program, args)` (elsewhere `run` means other things).
const NODE_RUNNER: &str = "run(\"";

fn rust_programs(path: &Path, text: &str, found: &mut BTreeMap<String, String>) {
    let node_file = path.components().any(|c| c.as_os_str() == "testkit")
        && path.file_name().is_some_and(|f| f.to_string_lossy().starts_with("node"));
    let runners = RUST_RUNNERS.iter().copied().chain(node_file.then_some(NODE_RUNNER));
    for runner in runners {
        for (at, _) in text.match_indices(runner) {
            let rest = &text[at + runner.len()..];
            let program = &rest[..rest.find('"').unwrap_or(0)];
            // Paths name a program already checked by name (/usr/bin/python3 -> python3).
            let name = program.rsplit('/').next().unwrap_or(program);
            if !name.is_empty() && !name.contains(' ') {
                found.entry(name.to_string()).or_insert_with(|| path.display().to_string());
            }
        }
    }
}

/// Bash builtins and keywords: not programs.
const SHELL_WORDS: &[&str] = &[
    "if", "then", "else", "elif", "fi", "for", "while", "until", "do", "done", "case", "esac", "in", "function", "{",
    "}", "!", "[[", "]]", "[", "]", "echo", "printf", "exit", "return", "set", "shift", "local", "export", "declare",
    "readonly", "trap", "eval", "exec", "cd", "command", "read", "wait", "true", "false", ":", "test", "source", ".",
    "break", "continue", "time", "unset", "type", "let", "pwd",
];

/// The words in command position of a bash script: the first word of each simple
/// command, after assignments. Comments go, quoted text is blanked (words inside
/// strings are never taken for commands), continued lines are joined and array
/// literals dropped.
fn shell_programs(path: &Path, text: &str, found: &mut BTreeMap<String, String>) {
    let mut functions = BTreeSet::new();
    for line in text.lines() {
        if let Some(name) = line.trim().strip_suffix("() {") {
            functions.insert(name.to_string());
        }
    }
    for line in logical_lines(text) {
        let line = line.replace("$(", ";").replace("&&", ";").replace("||", ";").replace(['|', '(', ')', '`'], ";");
        for segment in line.split(';') {
            let first = segment.split_whitespace().find(|w| {
                !w.contains('=')
                    && !matches!(
                        *w,
                        "if" | "elif" | "while" | "until" | "then" | "else" | "do" | "!" | "{" | "time" | "exec"
                    )
            });
            let Some(word) = first else { continue };
            let skip = SHELL_WORDS.contains(&word)
                || functions.contains(word)
                || word.starts_with(['$', '-', '"', '\'', '<', '>', '*', '&'])
                || word.contains(['/', '<', '>'])
                || word.chars().all(|c| c.is_ascii_digit());
            if !skip {
                found.entry(word.to_string()).or_insert_with(|| path.display().to_string());
            }
        }
    }
}

/// The script's lines without comments and with quoted text blanked, `\`-continued
/// lines joined, and `NAME=( ... )` array literals (one or many lines) removed.
fn logical_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    let mut in_array = false;
    for raw in text.lines() {
        let line = strip_comment_blank_quotes(raw);
        if in_array {
            if let Some(at) = line.find(')') {
                in_array = false;
                current.push_str(&line[at + 1..]);
            }
            continue;
        }
        let line = match line.find("=(") {
            Some(at) if !line[at..].contains(')') => {
                in_array = true;
                line[..at + 1].to_string()
            }
            Some(at) => format!("{}{}", &line[..at + 1], &line[at + line[at..].find(')').unwrap_or(0) + 1..]),
            None => line,
        };
        match line.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None if in_array => current.push_str(&line),
            None => {
                current.push_str(&line);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    lines.push(current);
    lines
}

/// `line` up to its comment, with the contents of its quoted strings blanked (the
/// quotes kept).
fn strip_comment_blank_quotes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut quote = None;
    let mut previous = ' ';
    for c in line.chars() {
        match (quote, c) {
            (None, '#') if previous.is_whitespace() => break,
            (None, '"' | '\'') => {
                quote = Some(c);
                out.push(c);
            }
            (Some(q), c) if c == q => {
                quote = None;
                out.push(c);
            }
            (Some(_), _) => out.push('x'),
            (None, c) => out.push(c),
        }
        previous = c;
    }
    out
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                files(&path, out);
            }
        } else {
            out.push(path);
        }
    }
}

#[test]
fn every_program_the_sources_run_is_listed() {
    let root = repo_root();
    let mut found = BTreeMap::new();
    let mut sources = Vec::new();
    files(&root.join("crates"), &mut sources);
    for path in sources.iter().filter(|p| p.extension().is_some_and(|e| e == "rs")) {
        rust_programs(path, &std::fs::read_to_string(path).unwrap(), &mut found);
    }
    let scripts = std::fs::read_dir(root.join("scripts")).unwrap().flatten().map(|e| e.path());
    for path in scripts.filter(|p| p.extension().is_some_and(|e| e == "sh")).chain([root.join(".ci/run")]) {
        shell_programs(&path, &std::fs::read_to_string(&path).unwrap(), &mut found);
    }
    // The scanner itself must see what it is meant to see.
    for known in ["ip", "nft", "unshare", "apt-get", "flock", "go", "cargo"] {
        assert!(found.contains_key(known), "the scan missed {known}: {found:?}");
    }
    let listed = listed();
    // Our own binaries and the node's (built by the scripts, run by path).
    let ours = ["kong-mesh-cni", "controller"];
    let missing: Vec<String> = found
        .iter()
        .filter(|(p, _)| !listed.contains_key(*p) && !ours.contains(&p.as_str()))
        .map(|(p, file)| format!("{p} (run in {file})"))
        .collect();
    assert!(
        missing.is_empty(),
        "add these to scripts/host-programs.txt (and their package to host-deps.sh):\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_scanners_find_programs_where_they_are_run() {
    let mut found = BTreeMap::new();
    shell_programs(
        Path::new("x.sh"),
        "f() {\nx=$(jq -r .a \"$f\" | sort -u)\nif ! command -v go >/dev/null; then apt-get install \"a | b\"; fi\nf && rsync a b # Helm's comment: not | cut\nA=(\n\tone two # three\n)\nB=(four) C=1 \\\n\tgzip -9 \\\n\tfive\n",
        &mut found,
    );
    rust_programs(
        Path::new("x.rs"),
        "let _ = Command::new(\"/usr/sbin/conntrack\").status(); ns.exec(\"tc\", &[]);",
        &mut found,
    );
    let names: Vec<&str> = found.keys().map(String::as_str).collect();
    assert_eq!(names, ["apt-get", "conntrack", "gzip", "jq", "rsync", "sort", "tc"]);
}
