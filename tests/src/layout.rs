//! The workspace's layout rules, checked from the source text: the module
//! import graph of each crate has no cycle.
//!
//! A module is a file (`src/a/b.rs` or `src/a/b/mod.rs` is `a::b`,
//! `src/lib.rs` the root). Module `m` imports module `n` when `m`'s code
//! names a path under `crate::n` (or reaches it with `super::`/`self::`),
//! in a `use` tree or inline; the path resolves to the longest prefix that
//! is a module. Declaring a child (`mod b;`) is containment, not an import;
//! a parent's `pub use b::X` is an import of its child, so a child that
//! takes `X` back from the parent closes a cycle. Unit tests (`#[cfg(test)]`
//! onwards, `tests.rs` files) are left out: they may use anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One crate's modules and the imports between them.
#[derive(Debug, Default)]
pub struct ModuleGraph {
    /// module path (`a::b`, `` for the root) → modules it imports.
    pub imports: BTreeMap<String, BTreeSet<String>>,
}

impl ModuleGraph {
    /// Reads every module under `src` (the directory holding `lib.rs` or
    /// `main.rs`). Binaries under `src/bin/` are crates of their own and
    /// are left out.
    pub fn read(src: &Path) -> std::io::Result<ModuleGraph> {
        let mut files = Vec::new();
        collect_rs_files(src, &mut files)?;
        let modules: BTreeMap<String, PathBuf> = files
            .into_iter()
            .filter_map(|file| module_path(src, &file).map(|module| (module, file)))
            .collect();
        let known: BTreeSet<String> = modules.keys().cloned().collect();
        let mut graph = ModuleGraph::default();
        for (module, file) in &modules {
            let text = std::fs::read_to_string(file)?;
            let code = without_tests_and_comments(&text);
            let mut targets = BTreeSet::new();
            for path in crate_paths(&code, module, &known) {
                if let Some(target) = resolve(&path, &known) {
                    targets.insert(target);
                }
            }
            targets.remove(module);
            graph.imports.insert(module.clone(), targets);
        }
        Ok(graph)
    }

    /// Every import cycle: strongly connected components of more than one
    /// module, each sorted; the crate root is named `crate`.
    pub fn cycles(&self) -> Vec<Vec<String>> {
        strongly_connected(&self.imports)
            .into_iter()
            .filter(|component| component.len() > 1)
            .map(|component| {
                component
                    .into_iter()
                    .map(|m| if m.is_empty() { "crate".to_owned() } else { m })
                    .collect()
            })
            .collect()
    }
}

fn collect_rs_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|name| name == "bin") {
                continue;
            }
            collect_rs_files(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// `src/a/b.rs` → `a::b`; `src/a/mod.rs` → `a`; `src/lib.rs` → ``;
/// `tests.rs` files and `main.rs` (another crate) → none.
fn module_path(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> = relative
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?;
    match stem {
        "lib" if parts.is_empty() => {}
        "main" if parts.is_empty() => return None,
        "tests" => return None,
        "mod" => {}
        _ => parts.push(stem.to_owned()),
    }
    Some(parts.join("::"))
}

/// The code before the first `#[cfg(test)]`, without `//` comments and
/// string literals' contents.
fn without_tests_and_comments(text: &str) -> String {
    let mut code = String::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") {
            break;
        }
        let line = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        code.push_str(&strip_strings(line));
        code.push('\n');
    }
    code
}

fn strip_strings(line: &str) -> String {
    let mut out = String::new();
    let mut in_string = false;
    let mut escaped = false;
    for c in line.chars() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
                out.push('"');
            }
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        out.push(c);
    }
    out
}

/// Every path into this crate that `code` (of `module`) names, as absolute
/// segment lists: `crate::a::{b, c::D}` gives `[a, b]` and `[a, c, D]`;
/// `super::x`, `self::x` and `child::x` (a child module by its bare name)
/// are made absolute.
fn crate_paths(code: &str, module: &str, known: &BTreeSet<String>) -> Vec<Vec<String>> {
    let chars: Vec<char> = code.chars().collect();
    let mut anchors = anchors(module);
    anchors.extend(children(module, known));
    let mut paths = Vec::new();
    let mut at = 0;
    while at < chars.len() {
        let starts_word = at == 0 || !is_ident(chars[at - 1]) && chars[at - 1] != ':';
        if starts_word {
            for (keyword, base) in &anchors {
                if starts_with(&chars, at, keyword) {
                    let mut end = at + keyword.len();
                    let tree = read_tree(&chars, &mut end);
                    for tail in tree {
                        let base: &Vec<String> = base;
                        let mut path = base.clone();
                        path.extend(tail);
                        paths.push(path);
                    }
                    at = end;
                    break;
                }
            }
        }
        at += 1;
    }
    paths
}

/// `name::` for each direct child module of `module`, with the child's path.
fn children(module: &str, known: &BTreeSet<String>) -> Vec<(String, Vec<String>)> {
    let prefix = if module.is_empty() {
        String::new()
    } else {
        format!("{module}::")
    };
    known
        .iter()
        .filter_map(|other| {
            let name = other.strip_prefix(&prefix)?;
            (!name.is_empty() && !name.contains("::")).then(|| {
                let path: Vec<String> = other.split("::").map(str::to_owned).collect();
                (format!("{name}::"), path)
            })
        })
        .collect()
}

/// The prefixes that start a path into this crate, with the module they
/// stand for.
fn anchors(module: &str) -> Vec<(String, Vec<String>)> {
    let own: Vec<String> = if module.is_empty() {
        Vec::new()
    } else {
        module.split("::").map(str::to_owned).collect()
    };
    let mut parent = own.clone();
    parent.pop();
    let mut grandparent = parent.clone();
    grandparent.pop();
    vec![
        ("crate::".to_owned(), Vec::new()),
        ("super::super::".to_owned(), grandparent),
        ("super::".to_owned(), parent),
        ("self::".to_owned(), own),
    ]
}

fn starts_with(chars: &[char], at: usize, text: &str) -> bool {
    text.chars()
        .enumerate()
        .all(|(i, c)| chars.get(at + i) == Some(&c))
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Reads a use tree after `crate::`: `a::b`, `{a, b::{c, d}}`, `a::*`.
/// Returns each leaf path's segments.
fn read_tree(chars: &[char], at: &mut usize) -> Vec<Vec<String>> {
    skip_space(chars, at);
    if chars.get(*at) == Some(&'{') {
        *at += 1;
        let mut all = Vec::new();
        loop {
            skip_space(chars, at);
            match chars.get(*at) {
                Some('}') => {
                    *at += 1;
                    break;
                }
                Some(',') => *at += 1,
                None => break,
                _ => {
                    let before = *at;
                    all.extend(read_tree(chars, at));
                    if *at == before {
                        *at += 1;
                    }
                }
            }
        }
        return all;
    }
    let mut segment = String::new();
    while let Some(&c) = chars.get(*at) {
        if !is_ident(c) {
            break;
        }
        segment.push(c);
        *at += 1;
    }
    if segment.is_empty() {
        return vec![Vec::new()];
    }
    if starts_with(chars, *at, "::") {
        *at += 2;
        return read_tree(chars, at)
            .into_iter()
            .map(|mut tail| {
                tail.insert(0, segment.clone());
                tail
            })
            .collect();
    }
    vec![vec![segment]]
}

fn skip_space(chars: &[char], at: &mut usize) {
    while chars.get(*at).is_some_and(|c| c.is_whitespace()) {
        *at += 1;
    }
}

/// The longest prefix of `path` that is a module.
fn resolve(path: &[String], known: &BTreeSet<String>) -> Option<String> {
    (0..=path.len())
        .rev()
        .map(|len| path[..len].join("::"))
        .find(|candidate| known.contains(candidate))
}

/// Tarjan's strongly connected components, each sorted.
fn strongly_connected(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        components: Vec<Vec<String>>,
    }
    fn visit<'a>(state: &mut State<'a>, node: &'a str) {
        state.index.insert(node, state.next);
        state.low.insert(node, state.next);
        state.next += 1;
        state.stack.push(node);
        state.on_stack.insert(node);
        let graph = state.graph;
        for next in graph.get(node).into_iter().flatten() {
            let next = next.as_str();
            if !state.index.contains_key(next) {
                visit(state, next);
                let low = state.low[node].min(state.low[next]);
                state.low.insert(node, low);
            } else if state.on_stack.contains(next) {
                let low = state.low[node].min(state.index[next]);
                state.low.insert(node, low);
            }
        }
        if state.low[node] == state.index[node] {
            let mut component = Vec::new();
            while let Some(top) = state.stack.pop() {
                state.on_stack.remove(top);
                component.push(top.to_owned());
                if top == node {
                    break;
                }
            }
            component.sort();
            state.components.push(component);
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        components: Vec::new(),
    };
    for node in graph.keys() {
        if !state.index.contains_key(node.as_str()) {
            visit(&mut state, node);
        }
    }
    state.components
}

/// The packages that `package` depends on, directly or not, as recorded in
/// `Cargo.lock` (normal, build and dev dependencies alike: the lock file
/// does not tell them apart).
pub fn locked_dependencies(lock: &str, package: &str) -> BTreeSet<String> {
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut in_deps = false;
    for line in lock.lines() {
        let line = line.trim();
        if line == "[[package]]" {
            current = None;
            in_deps = false;
        } else if let Some(name) = line.strip_prefix("name = ") {
            let name = name.trim_matches('"').to_owned();
            deps.entry(name.clone()).or_default();
            current = Some(name);
        } else if line.starts_with("dependencies = [") {
            in_deps = true;
        } else if in_deps && line == "]" {
            in_deps = false;
        } else if in_deps {
            let dep = line.trim_matches(|c| c == '"' || c == ',');
            let dep = dep.split(' ').next().unwrap_or(dep).to_owned();
            if let Some(current) = &current {
                deps.entry(current.clone()).or_default().push(dep);
            }
        }
    }
    let mut seen = BTreeSet::new();
    let mut queue = vec![package.to_owned()];
    while let Some(next) = queue.pop() {
        for dep in deps.get(&next).into_iter().flatten() {
            if seen.insert(dep.clone()) {
                queue.push(dep.clone());
            }
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locked_dependencies_are_transitive() {
        let lock = "[[package]]\nname = \"a\"\ndependencies = [\n \"b\",\n]\n\n[[package]]\nname = \"b\"\nversion = \"1\"\ndependencies = [\n \"c 0.1.0\",\n]\n\n[[package]]\nname = \"c\"\n\n[[package]]\nname = \"d\"\n";
        let deps = locked_dependencies(lock, "a");
        assert_eq!(deps.into_iter().collect::<Vec<_>>(), ["b", "c"]);
    }

    fn paths(code: &str, module: &str) -> Vec<String> {
        let known: BTreeSet<String> = ["", "x", "a", "a::b", "a::inner", "m"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        crate_paths(code, module, &known)
            .into_iter()
            .map(|p| p.join("::"))
            .collect()
    }

    #[test]
    fn use_trees_expand_to_every_leaf() {
        assert_eq!(
            paths("use crate::{a::{B, c::D}, e};", "x"),
            ["a::B", "a::c::D", "e"]
        );
        assert_eq!(paths("let x = crate::m::f(1);", "x"), ["m::f"]);
        assert_eq!(paths("use super::Thing;", "a::b"), ["a::Thing"]);
        assert_eq!(paths("use self::inner::X;", "a"), ["a::inner::X"]);
        assert!(paths("let s = mycrate::x;", "a").is_empty());
        // A child module named without a prefix.
        assert_eq!(
            paths("use inner::Y; let z = b::f();", "a"),
            ["a::inner::Y", "a::b::f"]
        );
    }

    #[test]
    fn comments_strings_and_unit_tests_are_not_imports() {
        let code = without_tests_and_comments(
            "//! see [`crate::a`]\nlet s = \"crate::b\";\nuse crate::c;\n#[cfg(test)]\nmod tests { use crate::d; }\n",
        );
        assert_eq!(paths(&code, "x"), ["c"]);
    }

    #[test]
    fn a_cycle_through_three_modules_is_found() {
        let mut graph = ModuleGraph::default();
        for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
            graph
                .imports
                .entry(from.to_owned())
                .or_default()
                .insert(to.to_owned());
        }
        graph.imports.entry("d".to_owned()).or_default();
        assert_eq!(graph.cycles(), vec![vec!["a", "b", "c"]]);
    }
}
