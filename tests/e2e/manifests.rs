//! The Kubernetes manifests and `meshctl inject` against real tools: the
//! kustomizations (base, kind, and ha: 3 control planes on a 3-member etcd)
//! build with `kubectl kustomize`, and every manifest and
//! every output of `meshctl inject` passes `kubernetes-validate --strict`
//! for the Kubernetes version of the kind node image (1.31). Also the
//! inject command's stdin/stdout behaviour and exit codes.
//!
//! The tools and their strict validation are `meshlet_e2e::k8s`.

use meshlet_e2e::k8s::{root, run, succeed, tool, validate_strict, KUBERNETES_VERSION};
use meshlet_e2e::process::binary;

#[test]
fn both_kustomizations_build_and_pass_strict_validation() {
    let (Some(kubectl), Some(validator)) = (
        tool("kubectl", "MESHLET_KUBECTL"),
        tool("kubernetes-validate", "MESHLET_KUBERNETES_VALIDATE"),
    ) else {
        return;
    };
    // base: the namespace, the Service, the StatefulSet, the NetworkPolicy,
    // the MutatingWebhookConfiguration; kind: base + 4 demo Deployments and
    // 3 Services + the gateway's Deployment and Service.
    // ha: kind + the etcd StatefulSet, its headless Service, NetworkPolicy
    // and PodDisruptionBudget, the control plane's PodDisruptionBudget and
    // the NetworkPolicy admitting the replicas to each other.
    for (dir, expected) in [
        ("manifests/base", 5),
        ("manifests/overlays/kind", 14),
        ("manifests/overlays/ha", 20),
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
    // Each replica registers its pod IP for the others' fan-out, and they
    // may reach each other's API.
    // POD_IP first: $(POD_IP) expands only from variables listed before.
    let pod_ip = cp.find("- name: POD_IP\n");
    let url = cp.find("- name: MESHLET_ADVERTISE_URL\n");
    assert!(
        pod_ip < url && pod_ip.is_some() && cp.contains("fieldPath: status.podIP"),
        "{cp}"
    );
    assert!(cp.contains("value: https://$(POD_IP):15010\n"), "{cp}");
    let peers = document(&yaml, "NetworkPolicy", "meshlet-control-plane-peers");
    assert!(peers.contains("port: 15010"), "{peers}");
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

/// Issue 19, done-means 1: a Deployment with labels, a Job without any and
/// a Service in one file: both workloads injected (the Job's service name
/// is its own), the Service byte for byte, and the output strictly valid.
#[test]
fn inject_injects_unlabelled_workloads_and_passes_the_rest_through() {
    let meshctl = binary("meshctl");
    let file = "tests/e2e/fixtures/inject-mixed.yaml";
    let input = std::fs::read_to_string(root().join(file)).unwrap();
    let out = run(&meshctl, &["inject", "-f", file], None);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("deployment/web injected"), "{stderr}");
    assert!(stderr.contains("job/migrate injected"), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    let injected = String::from_utf8(out.stdout).unwrap();

    // The Service's document, from its `---` line to the end, is unchanged.
    let service = &input[input.rfind("---\n# kept as written").unwrap()..];
    assert!(injected.ends_with(service), "{injected}");

    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&injected)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 3);
    let service_env = |doc: &serde_yaml::Value| {
        let proxy = &doc["spec"]["template"]["spec"]["initContainers"][1];
        assert_eq!(proxy["name"], "meshlet-proxy");
        proxy["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "MESHLET_SERVICE")
            .unwrap()
            .clone()
    };
    assert_eq!(
        service_env(&docs[0])["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.labels['app']"
    );
    assert_eq!(service_env(&docs[1])["value"], "migrate");
    assert_eq!(
        docs[1]["spec"]["template"]["spec"]["volumes"][1]["secret"]["secretName"],
        "meshlet-sidecar-migrate"
    );

    let Some(validator) = tool("kubernetes-validate", "MESHLET_KUBERNETES_VALIDATE") else {
        return;
    };
    assert_eq!(validate_strict(&validator, file, &injected), 3);
}

/// A document that cannot be injected is written unchanged with a warning
/// naming it; the file is never refused for it (exit 0).
#[test]
fn inject_passes_what_it_cannot_inject_through_with_a_warning() {
    let meshctl = binary("meshctl");
    let input = "kind: ConfigMap\nmetadata: {name: a}\n---\nkind: Deployment\n  bad: indent\n---\n\
                 kind: Job\nmetadata: {name: j}\nspec:\n  template:\n    spec:\n      containers: [{name: a, image: b}]\n";
    let out = run(&meshctl, &["inject", "-f", "-"], Some(input));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), input);
    let stderr = String::from_utf8(out.stderr).unwrap();
    let warnings: Vec<&str> = stderr.lines().collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(
        warnings[0].starts_with("meshctl: warning: -: document 2: invalid YAML at line 5"),
        "{stderr}"
    );
    assert!(
        warnings[1].starts_with(
            "meshctl: warning: -: document 3 (Job j): no container declares a containerPort"
        ),
        "{stderr}"
    );
    assert!(warnings
        .iter()
        .all(|w| w.ends_with("passed through unchanged")));

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
