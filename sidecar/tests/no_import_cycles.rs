//! The sidecar's modules import each other without cycles: a module never
//! imports one that, directly or through others, imports it back.
//!
//! Reads `src/` as text: every `crate::…` and `super::…` path (in `use`
//! items and inline, test modules included) is an edge from the file it is
//! in to the module file it names; then any strongly connected set of more
//! than one file fails the test, listing the edges that tie it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

#[test]
fn sidecar_modules_have_no_import_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&src);
    let graph: BTreeMap<Module, BTreeSet<Module>> = modules
        .iter()
        .map(|(module, file)| {
            let text = std::fs::read_to_string(file).unwrap();
            (module.clone(), imports(module, &text, &modules))
        })
        .collect();
    assert!(graph.len() > 30, "read {} modules", graph.len());
    let cycles = strongly_connected(&graph);
    let report: Vec<String> = cycles
        .iter()
        .map(|cycle| {
            let edges: Vec<String> = cycle
                .iter()
                .flat_map(|from| {
                    graph[from]
                        .iter()
                        .filter(|to| cycle.contains(to))
                        .map(move |to| format!("  {} -> {}", name(from), name(to)))
                })
                .collect();
            format!("cycle:\n{}", edges.join("\n"))
        })
        .collect();
    assert!(report.is_empty(), "{}", report.join("\n"));
}

#[test]
fn the_reader_sees_a_cycle() {
    // Two files that import each other (and `super` from a test module,
    // which is the file itself, not its parent).
    let modules: BTreeMap<Module, PathBuf> = [
        (vec!["a".to_owned()], PathBuf::from("a.rs")),
        (vec!["b".to_owned()], PathBuf::from("b.rs")),
    ]
    .into_iter()
    .collect();
    let a = "use crate::b::{self, B};\n#[cfg(test)]\nmod tests {\n    use super::*;\n}\n";
    let b = "fn f() -> crate::a::A { todo!() }\n";
    let graph: BTreeMap<Module, BTreeSet<Module>> = [
        (modules_key("a"), imports(&modules_key("a"), a, &modules)),
        (modules_key("b"), imports(&modules_key("b"), b, &modules)),
    ]
    .into_iter()
    .collect();
    assert_eq!(graph[&modules_key("a")], BTreeSet::from([modules_key("b")]));
    assert_eq!(strongly_connected(&graph).len(), 1);
}

fn modules_key(name: &str) -> Module {
    vec![name.to_owned()]
}

fn name(module: &Module) -> String {
    if module.is_empty() {
        "lib".to_owned()
    } else {
        module.join("/")
    }
}

/// Every module file under `src` (the binary's `main.rs` is another crate).
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![src.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || path.ends_with("main.rs") {
                continue;
            }
            let relative = path.strip_prefix(src).unwrap().with_extension("");
            let mut module: Module = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
                module.pop();
            }
            found.insert(module, path);
        }
    }
    found
}

/// The modules `text` (the file of `module`) names through `crate::` and
/// `super::` paths, other than itself.
fn imports(module: &Module, text: &str, modules: &BTreeMap<Module, PathBuf>) -> BTreeSet<Module> {
    let code = strip_comments_and_literals(text);
    let mut found = BTreeSet::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < code.len() {
        let rest = &code[i..];
        let starts_word = i == 0 || !is_ident(bytes[i - 1]);
        let (base, after) = if starts_word && rest.starts_with("crate::") {
            (Vec::new(), i + "crate::".len())
        } else if starts_word && rest.starts_with("super::") {
            // `super` in a file's own items is its parent; inside an inline
            // module (`mod tests { … }`) one level less up.
            let inline = inline_module_depth(&code[..i]);
            let mut base = module.clone();
            let ups = 1usize.saturating_sub(inline);
            for _ in 0..ups {
                base.pop();
            }
            let mut after = i + "super::".len();
            while code[after..].starts_with("super::") {
                base.pop();
                after += "super::".len();
            }
            (base, after)
        } else {
            i += 1;
            continue;
        };
        for path in expand(&base, &code[after..]) {
            if let Some(target) = resolve(&path, modules) {
                // An item of the crate root counts (a re-export from
                // `lib.rs` imported by a child is a cycle); the bare root
                // path (`crate::` before a module name) is resolved above.
                if &target != module {
                    found.insert(target);
                }
            }
        }
        i = after;
    }
    found
}

/// The paths a `use` tree starting at `rest` names, each as segments after
/// `base` (`a::{b::C, d}` → `a::b::C`, `a::d`).
fn expand(base: &Module, rest: &str) -> Vec<Module> {
    let mut path = base.clone();
    let mut i = 0;
    let bytes = rest.as_bytes();
    loop {
        let start = i;
        while i < bytes.len() && is_ident(bytes[i]) {
            i += 1;
        }
        if i > start {
            path.push(rest[start..i].to_owned());
        }
        let group = if rest[i..].starts_with("::{") {
            Some(i + 3)
        } else if i == 0 && rest.starts_with('{') {
            Some(1)
        } else {
            None
        };
        if let Some(inner_start) = group {
            let mut depth = 1;
            let mut j = inner_start;
            while j < bytes.len() && depth > 0 {
                match bytes[j] {
                    b'{' => depth += 1,
                    b'}' => depth -= 1,
                    _ => {}
                }
                j += 1;
            }
            let inner = &rest[inner_start..j.saturating_sub(1)];
            return split_top_level(inner)
                .into_iter()
                .flat_map(|item| expand(&path, item.trim()))
                .collect();
        }
        if rest[i..].starts_with("::") {
            i += 2;
            continue;
        }
        return vec![path];
    }
}

fn split_top_level(text: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&text[start..]);
    items.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

/// The longest prefix of `path` that is a module file; the crate root
/// when the path names an item of `lib.rs`.
fn resolve(path: &Module, modules: &BTreeMap<Module, PathBuf>) -> Option<Module> {
    let path: Vec<String> = path.iter().filter(|s| *s != "self").cloned().collect();
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|prefix| modules.contains_key(prefix))
}

/// How many inline `mod name {` blocks enclose the end of `code`.
fn inline_module_depth(code: &str) -> usize {
    let mut open: Vec<bool> = Vec::new();
    let bytes = code.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'{' => {
                let before = code[..i].trim_end();
                let is_mod =
                    before
                        .rsplit_once(|c: char| c.is_whitespace())
                        .is_some_and(|(head, ident)| {
                            head.trim_end().ends_with("mod") && ident.bytes().all(is_ident)
                        });
                open.push(is_mod);
            }
            b'}' => {
                open.pop();
            }
            _ => {}
        }
    }
    open.iter().filter(|m| **m).count()
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// `text` with comments, string and char literals blanked out (same
/// length), so that braces and paths inside them are not read as code.
fn strip_comments_and_literals(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = bytes.to_vec();
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for b in &mut out[from..to.min(bytes.len())] {
            if *b != b'\n' {
                *b = b' ';
            }
        }
    };
    while i < bytes.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            let end = rest.find('\n').map_or(bytes.len(), |e| i + e);
            blank(&mut out, i, end);
            i = end;
        } else if rest.starts_with("/*") {
            let end = rest.find("*/").map_or(bytes.len(), |e| i + e + 2);
            blank(&mut out, i, end);
            i = end;
        } else if rest.starts_with("r#\"") || rest.starts_with("r\"") || rest.starts_with("br\"") {
            let hashes = rest.trim_start_matches('b')[1..]
                .bytes()
                .take_while(|&b| b == b'#')
                .count();
            let open = rest.find('"').unwrap();
            let close = format!("\"{}", "#".repeat(hashes));
            let end = rest[open + 1..]
                .find(&close)
                .map_or(bytes.len(), |e| i + open + 1 + e + close.len());
            blank(&mut out, i, end);
            i = end;
        } else if bytes[i] == b'"' && (i == 0 || !is_ident(bytes[i - 1]) || bytes[i - 1] == b'b') {
            let mut j = i + 1;
            while j < bytes.len() && bytes[j] != b'"' {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            blank(&mut out, i, j + 1);
            i = j + 1;
        } else if bytes[i] == b'\'' {
            // A char literal ('x', '\n', '{'), not a lifetime ('a).
            let len = if rest[1..].starts_with('\\') {
                rest[2..].find('\'').map(|e| e + 3)
            } else {
                rest[1..]
                    .char_indices()
                    .nth(1)
                    .filter(|(_, c)| *c == '\'')
                    .map(|(e, _)| e + 2)
            };
            match len {
                Some(len) => {
                    blank(&mut out, i, i + len);
                    i += len;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// Tarjan's strongly connected components with more than one module.
fn strongly_connected(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct State<'g> {
        graph: &'g BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'g Module, usize>,
        low: BTreeMap<&'g Module, usize>,
        stack: Vec<&'g Module>,
        on_stack: BTreeSet<&'g Module>,
        found: Vec<Vec<Module>>,
    }
    fn visit<'g>(state: &mut State<'g>, v: &'g Module) {
        let n = state.index.len();
        state.index.insert(v, n);
        state.low.insert(v, n);
        state.stack.push(v);
        state.on_stack.insert(v);
        for w in state.graph.get(v).into_iter().flatten() {
            let Some((w, _)) = state.graph.get_key_value(w) else {
                continue;
            };
            if !state.index.contains_key(w) {
                visit(state, w);
                let low = state.low[v].min(state.low[w]);
                state.low.insert(v, low);
            } else if state.on_stack.contains(w) {
                let low = state.low[v].min(state.index[w]);
                state.low.insert(v, low);
            }
        }
        if state.low[v] == state.index[v] {
            let mut component = Vec::new();
            while let Some(w) = state.stack.pop() {
                state.on_stack.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                state.found.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v) {
            visit(&mut state, v);
        }
    }
    state.found
}
