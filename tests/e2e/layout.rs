//! Layout rules of the workspace (issue 12): no crate has an import cycle
//! between its modules, and `meshctl` does not depend on the server.

use std::path::{Path, PathBuf};

use meshlet_e2e::layout::ModuleGraph;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// Every crate of the workspace: the folders with a `Cargo.toml` and a `src/`.
fn crate_sources() -> Vec<PathBuf> {
    let root = workspace();
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("workspace readable")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|dir| dir.join("Cargo.toml").is_file() && dir.join("src").is_dir())
        .map(|dir| dir.join("src"))
        .collect();
    sources.sort();
    sources
}

#[test]
fn no_crate_has_an_import_cycle() {
    let sources = crate_sources();
    assert!(sources.len() >= 5, "crates found: {sources:?}");
    let mut found = Vec::new();
    for src in &sources {
        let graph = ModuleGraph::read(src).expect("sources readable");
        assert!(
            !graph.imports.is_empty(),
            "no modules read under {}",
            src.display()
        );
        for cycle in graph.cycles() {
            let name = src.strip_prefix(workspace()).unwrap_or(src);
            found.push(format!("{}: {}", name.display(), cycle.join(" → ")));
        }
    }
    assert!(
        found.is_empty(),
        "import cycles (move the shared items to a leaf module):\n{}",
        found.join("\n")
    );
}

#[test]
fn meshctl_does_not_depend_on_the_server_or_its_store() {
    let lock = std::fs::read_to_string(workspace().join("Cargo.lock")).expect("Cargo.lock");
    let deps = meshlet_e2e::layout::locked_dependencies(&lock, "meshctl");
    assert!(
        deps.contains("meshlet-api"),
        "meshctl is a package of its own that depends on meshlet-api: {deps:?}"
    );
    for server_only in ["meshlet-control-plane", "axum", "redb"] {
        assert!(
            !deps.contains(server_only),
            "meshctl depends on {server_only}"
        );
    }
}

/// Every file and folder of the repository (relative paths; folders end
/// with `/`), leaving out build output and VCS data.
fn tree() -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "target" || name.starts_with('.') {
                continue;
            }
            let relative = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if path.is_dir() {
                out.push(format!("{relative}/"));
                walk(root, &path, out);
            } else {
                out.push(relative);
            }
        }
    }
    let root = workspace();
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    out
}

/// The code spans of a Markdown text (between single backticks).
fn code_spans(markdown: &str) -> Vec<&str> {
    let mut spans = Vec::new();
    let mut in_fence = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find('`') {
            let after = &rest[start + 1..];
            let Some(end) = after.find('`') else { break };
            spans.push(&after[..end]);
            rest = &after[end + 1..];
        }
    }
    spans
}

#[test]
fn architecture_md_names_only_what_exists_and_every_module() {
    let text =
        std::fs::read_to_string(workspace().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let tree = tree();
    let exists = |name: &str| {
        tree.iter()
            .any(|path| path == name || path.ends_with(&format!("/{name}")))
    };
    // Every file or folder it names (a code span ending in `.rs` or `/`,
    // without wildcards or alternatives) exists.
    let mut missing: Vec<&str> = code_spans(&text)
        .into_iter()
        .filter(|span| span.ends_with(".rs") || (span.ends_with('/') && span.len() > 1))
        .filter(|span| !span.contains(['{', '*', ' ', '<', '$', ':']))
        .filter(|span| !exists(span))
        .collect();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names what the tree lacks: {missing:?}"
    );

    // Every module of every crate is named: by file name (`forward.rs`),
    // or a folder's `mod.rs` by the folder (`upstream/`).
    let mut unnamed = Vec::new();
    for src in crate_sources() {
        let crate_dir = src.parent().unwrap().to_owned();
        for path in tree.iter().filter(|p| p.ends_with(".rs")) {
            let full = workspace().join(path);
            let Ok(relative) = full.strip_prefix(&src) else {
                continue;
            };
            let file = relative.file_name().unwrap().to_string_lossy().into_owned();
            let test_only = file == "tests.rs" || file.ends_with("_tests.rs");
            if test_only || relative.components().any(|c| c.as_os_str() == "tests") {
                continue;
            }
            let named = if file == "mod.rs" {
                let folder = relative
                    .parent()
                    .unwrap()
                    .file_name()
                    .unwrap()
                    .to_string_lossy();
                text.contains(&format!("{folder}/"))
            } else {
                text.contains(&file)
            };
            if !named {
                let shown = full.strip_prefix(workspace()).unwrap_or(&crate_dir);
                unnamed.push(shown.display().to_string());
            }
        }
    }
    assert!(
        unnamed.is_empty(),
        "modules ARCHITECTURE.md does not name: {unnamed:?}"
    );
}
