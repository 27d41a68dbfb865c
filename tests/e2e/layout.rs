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
