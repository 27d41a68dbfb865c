//! No import cycles between the modules of `meshlet-api`, the control
//! plane and `meshctl`: a module never imports one that (directly or
//! through others) imports it back.
//!
//! The graph is read from the sources: one node per module file, an edge
//! for each `crate::a::b` or `super::...` path outside comments and test
//! modules, resolved to the longest module path that exists. (A module's
//! own `mod` and `pub use` of its children are declarations, not edges.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/a/b.rs` and `src/a/b/mod.rs` → `a::b`; `lib.rs`, `main.rs` and
/// `bin/*` → `` (the crate root); `None` for a test module's own file.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    match parts.as_slice() {
        [only] if only == "lib" || only == "main" => Some(String::new()),
        [first, ..] if first == "bin" => Some(String::new()),
        [.., last] if last == "tests" => None,
        [init @ .., last] if last == "mod" => Some(init.join("::")),
        all => Some(all.join("::")),
    }
}

/// The source without comments and without its `#[cfg(test)] mod tests`.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths a module names: `crate::x::y` and `super::x` (made absolute).
fn referenced_paths(module: &str, code: &str) -> Vec<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = Vec::new();
    for (at, _) in code
        .match_indices("crate::")
        .chain(code.match_indices("super::"))
    {
        let preceded = code[..at].chars().next_back().is_some_and(ident);
        if preceded {
            continue; // `meshlet_api::...crate::`, `a::super::` or the like
        }
        let rest: String = code[at..].chars().take_while(|c| ident(*c)).collect();
        let absolute = match rest.strip_prefix("crate::") {
            Some(path) => path.to_owned(),
            None => {
                let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
                let tail = rest.trim_start_matches("super::");
                if parent.is_empty() {
                    tail.to_owned()
                } else {
                    format!("{parent}::{tail}")
                }
            }
        };
        out.push(absolute);
    }
    out
}

/// The import graph of the crate whose sources are in `src`.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeMap<String, PathBuf> = files
        .iter()
        .filter_map(|f| module_of(src, f).map(|m| (m, f.clone())))
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in &modules {
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let targets = edges.entry(module.clone()).or_default();
        for path in referenced_paths(module, &code) {
            let mut candidate = path.trim_end_matches("::").to_owned();
            let target = loop {
                if modules.contains_key(&candidate) {
                    break Some(candidate);
                }
                match candidate.rsplit_once("::") {
                    Some((shorter, _)) => candidate = shorter.to_owned(),
                    None => break None,
                }
            };
            if let Some(target) = target {
                let child_of_module = target.starts_with(&format!("{module}::"));
                if &target != module && !target.is_empty() && !child_of_module {
                    targets.insert(target);
                }
            }
        }
    }
    edges
}

/// A cycle of `edges` as `a -> b -> ... -> a`, if there is one.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, done, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|node| visit(node, edges, &mut done, &mut Vec::new()))
}

fn check(name: &str, crate_dir: &str) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(crate_dir)
        .join("src");
    let edges = graph(&src);
    assert!(edges.len() > 3, "no modules read under {}", src.display());
    if let Some(cycle) = find_cycle(&edges) {
        panic!(
            "import cycle in {name}: {}",
            cycle
                .iter()
                .map(|m| if m.is_empty() { "crate" } else { m.as_str() })
                .collect::<Vec<_>>()
                .join(" -> ")
        );
    }
}

#[test]
fn the_control_plane_has_no_import_cycle() {
    check("meshlet-control-plane", ".");
}

#[test]
fn meshctl_has_no_import_cycle() {
    check("meshctl", "../meshctl");
}

#[test]
fn the_api_crate_has_no_import_cycle() {
    check("meshlet-api", "../api");
}

#[test]
fn a_cycle_is_found() {
    let edges = BTreeMap::from([
        ("a".to_owned(), BTreeSet::from(["b".to_owned()])),
        ("b".to_owned(), BTreeSet::from(["c".to_owned()])),
        ("c".to_owned(), BTreeSet::from(["a".to_owned()])),
    ]);
    assert_eq!(
        find_cycle(&edges),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let code = "use crate::push::{Hub};\nuse super::model::from_hex;\n";
    assert_eq!(
        referenced_paths("traces::store", code),
        ["push::", "traces::model::from_hex"]
    );
}
