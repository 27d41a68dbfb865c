//! `meshctl validate`: offline checks of resource files with the same
//! parser the sidecar uses.

use std::process::{Command, Output};

use meshlet_e2e::process::{binary, TempDir};

fn meshctl(args: &[&str]) -> Output {
    Command::new(binary("meshctl"))
        .args(args)
        .output()
        .expect("run meshctl")
}

#[test]
fn the_example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/mesh.yaml");
    let out = meshctl(&["validate", "-f", example]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("service/frontend valid"), "{stdout}");
    assert!(stdout.contains("service/orders valid"), "{stdout}");
}

#[test]
fn every_example_policy_file_is_valid() {
    // What the demo (examples/demo.sh) and the kind script apply.
    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/policies");
    let mut checked = Vec::new();
    for dir in ["", "demo", "gateway", "faults"] {
        let path = format!("{policies}/{dir}");
        let out = meshctl(&["validate", "-f", &path]);
        assert!(
            out.status.success(),
            "{path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        checked.push(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stdout = checked.join("");
    for expected in [
        "route/shop valid",
        "faultinjectionpolicy/inventory-slow valid",
        "ratelimitpolicy/inventory-dry-run valid",
        "trafficsplit/orders-canary valid",
    ] {
        assert!(stdout.contains(expected), "{expected} in {stdout}");
    }
}

#[test]
fn an_invalid_file_in_a_directory_is_named_with_line_and_field() {
    let dir = TempDir::new();
    let good = "apiVersion: meshlet.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {}\n";
    std::fs::write(dir.path.join("a.yaml"), good).unwrap();
    let bad = "apiVersion: meshlet.dev/v1alpha1\nkind: Service\nmetadata: {name: b}\nspec:\n  endpoint: []\n";
    std::fs::write(dir.path.join("b.yaml"), bad).unwrap();
    let out = meshctl(&["validate", "-f", dir.path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("b.yaml: document 1, line 5"), "{stderr}");
    assert!(stderr.contains("field `spec.endpoint`"), "{stderr}");
    assert!(
        stderr.contains("unknown field `endpoint`, expected `endpoints`"),
        "{stderr}"
    );
}
