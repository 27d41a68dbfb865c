//! Unit tests of injection over files (`meshctl inject`): one per workload
//! kind, idempotence, pass-through of other kinds, multi-document input,
//! the service name's fallbacks, the annotations, and documents passed
//! through with a warning.

use super::*;

const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: orders
spec:
  selector:
    matchLabels: {app.kubernetes.io/name: orders}
  template:
    metadata:
      labels: {app.kubernetes.io/name: orders, version: v1}
    spec:
      containers:
        - name: orders
          image: demo:1
          ports:
            - containerPort: 8080
";

const SERVICE: &str = "\
# the orders Service, kept as written
apiVersion: v1
kind: Service
metadata: {name: orders}   # inline comment
spec:
  selector: {app.kubernetes.io/name: orders}
  ports: [{port: 80, targetPort: 8080}]
";

const CONFIG_MAP: &str = "\
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  key: 'value'
";

fn inject(text: &str) -> Injected {
    inject_text("in.yaml", text, &InjectOptions::default())
}

fn parse(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

/// A workload of `kind` whose pod template is the Deployment's.
fn workload(kind: &str) -> String {
    let pod = "\
metadata:
  labels: {app: batch}
spec:
  restartPolicy: Never
  containers:
    - name: main
      image: demo:1
      ports: [{containerPort: 9000}]
";
    let indent = |n: usize| {
        pod.lines()
            .map(|l| format!("{}{l}\n", " ".repeat(n)))
            .collect::<String>()
    };
    match kind {
        "CronJob" => format!(
            "apiVersion: batch/v1\nkind: CronJob\nmetadata: {{name: w}}\nspec:\n  schedule: '* * * * *'\n  jobTemplate:\n    spec:\n      template:\n{}",
            indent(8)
        ),
        "Pod" => format!("apiVersion: v1\nkind: Pod\n{}", pod.replace("metadata:\n", "metadata:\n  name: w\n")),
        _ => format!(
            "apiVersion: apps/v1\nkind: {kind}\nmetadata: {{name: w}}\nspec:\n  template:\n{}",
            indent(4)
        ),
    }
}

fn names(list: Option<&Value>) -> Vec<String> {
    list.and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no env {name}"))
}

#[test]
fn each_workload_kind_gets_init_and_native_sidecar() {
    let template_of = |kind: &str, doc: &Value| -> Value {
        match kind {
            "CronJob" => doc["spec"]["jobTemplate"]["spec"]["template"].clone(),
            "Pod" => doc.clone(),
            _ => doc["spec"]["template"].clone(),
        }
    };
    for kind in [
        "Deployment",
        "StatefulSet",
        "DaemonSet",
        "Job",
        "CronJob",
        "Pod",
    ] {
        let result = inject(&workload(kind));
        assert_eq!(result.reports.len(), 1, "{kind}");
        assert_eq!(result.reports[0].outcome, Outcome::Injected, "{kind}");
        assert_eq!(
            result.reports[0].workload,
            format!("{}/w", kind.to_ascii_lowercase())
        );
        let pod = template_of(kind, &parse(&result.text)[0]);
        let spec = &pod["spec"];
        assert_eq!(
            names(spec.get("initContainers")),
            ["meshlet-init", "meshlet-proxy"],
            "{kind}"
        );
        assert_eq!(names(spec.get("containers")), ["main"], "{kind}");
        let proxy = &spec["initContainers"][1];
        assert_eq!(proxy["restartPolicy"], "Always", "{kind}");
        assert_eq!(env(proxy, "MESHLET_APP_PORT")["value"], "9000");
        assert_eq!(
            env(proxy, "MESHLET_SERVICE")["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.labels['app']"
        );
        let annotations = &pod["metadata"]["annotations"];
        assert_eq!(annotations["meshlet.dev/injected"], "true", "{kind}");
        assert_eq!(annotations["prometheus.io/port"], "15020", "{kind}");
        assert_eq!(spec["volumes"][0]["name"], "meshlet-run");
    }
}

#[test]
fn the_proxy_is_configured_from_the_downward_api_and_locked_down() {
    let doc = &parse(&inject(DEPLOYMENT).text)[0];
    let spec = &doc["spec"]["template"]["spec"];
    let proxy = &spec["initContainers"][1];
    let field = |name: &str| env(proxy, name)["valueFrom"]["fieldRef"]["fieldPath"].clone();
    assert_eq!(field("MESHLET_INSTANCE_ID"), "metadata.name");
    assert_eq!(field("MESHLET_NAMESPACE"), "metadata.namespace");
    assert_eq!(field("MESHLET_ADVERTISE_IP"), "status.podIP");
    assert_eq!(
        field("MESHLET_SERVICE"),
        "metadata.labels['app.kubernetes.io/name']"
    );
    assert_eq!(env(proxy, "MESHLET_APP_PORT")["value"], "8080");
    assert_eq!(
        env(proxy, "MESHLET_LABELS")["value"],
        "app.kubernetes.io/name=orders,version=v1"
    );
    assert_eq!(
        env(proxy, "MESHLET_SNAPSHOT_FILE")["value"],
        "/var/run/meshlet/snapshot.json"
    );
    assert_eq!(proxy["image"], default_image());
    let args: Vec<&str> = proxy["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args[..10],
        [
            "--mode",
            "transparent",
            "--control-plane",
            DEFAULT_CONTROL_PLANE,
            "--token-file",
            "/var/run/meshlet/token/token",
            "--ca-file",
            "/var/run/meshlet/ca/ca.crt",
            "--admin-ip",
            "0.0.0.0"
        ]
    );
    assert_eq!(
        DEFAULT_CONTROL_PLANE,
        "https://meshlet-control-plane.meshlet.svc:15010"
    );
    let security = &proxy["securityContext"];
    assert_eq!(security["runAsUser"], 1337);
    assert_eq!(security["runAsGroup"], 1337);
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["livenessProbe"]["httpGet"]["path"], "/live");
    assert_eq!(proxy["startupProbe"]["httpGet"]["port"], 15020);
    assert!(proxy["resources"]["limits"]["memory"].is_string());

    // Only the init container gets root and the network capabilities.
    let init = &spec["initContainers"][0];
    assert_eq!(init["command"][0], "sidecar");
    assert_eq!(init["args"][0], "init-iptables");
    assert_eq!(init["args"][2], "1337");
    assert_eq!(init["securityContext"]["runAsUser"], 0);
    assert_eq!(init["securityContext"]["runAsNonRoot"], false);
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        parse("[NET_ADMIN, NET_RAW]")[0]
    );
    assert!(spec["containers"][0].get("securityContext").is_none());
}

#[test]
fn the_proxy_gets_its_service_s_token_and_the_mesh_ca() {
    let doc = &parse(&inject(DEPLOYMENT).text)[0];
    let template = &doc["spec"]["template"];
    let spec = &template["spec"];
    assert_eq!(
        template["metadata"]["labels"]["meshlet.dev/sidecar"],
        "injected"
    );
    let volumes = &spec["volumes"];
    assert_eq!(volumes[1]["name"], "meshlet-token");
    assert_eq!(volumes[1]["secret"]["secretName"], "meshlet-sidecar-orders");
    assert_eq!(volumes[1]["secret"]["defaultMode"], 0o400);
    assert_eq!(volumes[1]["secret"]["items"][0]["key"], "token");
    assert_eq!(volumes[2]["name"], "meshlet-ca");
    assert_eq!(volumes[2]["configMap"]["name"], "meshlet-ca");
    assert_eq!(volumes[2]["configMap"]["items"][0]["key"], "ca.crt");
    let mounts = &spec["initContainers"][1]["volumeMounts"];
    assert_eq!(mounts[1]["mountPath"], "/var/run/meshlet/token");
    assert_eq!(mounts[1]["readOnly"], true);
    assert_eq!(mounts[2]["mountPath"], "/var/run/meshlet/ca");
    // The non-root proxy reads the root-owned token through the fsGroup;
    // a pod's own fsGroup is kept.
    assert_eq!(spec["securityContext"]["fsGroup"], 1337);
    let own = DEPLOYMENT.replace(
        "    spec:\n",
        "    spec:\n      securityContext: {fsGroup: 2000}\n",
    );
    let doc = &parse(&inject(&own).text)[0];
    assert_eq!(
        doc["spec"]["template"]["spec"]["securityContext"]["fsGroup"],
        2000
    );
    // MESHLET_LABELS are the app's labels, not the added one.
    let proxy = &spec["initContainers"][1];
    assert!(!env(proxy, "MESHLET_LABELS")["value"]
        .as_str()
        .unwrap()
        .contains("meshlet.dev"));
}

#[test]
fn injecting_twice_gives_the_same_bytes() {
    let input = format!("{SERVICE}---\n{DEPLOYMENT}---\n{}", workload("Job"));
    let once = inject(&input);
    let twice = inject(&once.text);
    assert_eq!(twice.text, once.text);
    assert!(once.reports.iter().all(|r| r.outcome == Outcome::Injected));
    assert_eq!(twice.reports.len(), 2);
    assert!(twice
        .reports
        .iter()
        .all(|r| r.outcome == Outcome::AlreadyInjected));
}

#[test]
fn a_pod_with_a_proxy_container_but_no_annotation_counts_as_injected() {
    let input = DEPLOYMENT.replace("- name: orders", "- name: meshlet-proxy");
    let result = inject(&input);
    assert_eq!(result.text, input);
    assert_eq!(result.reports[0].outcome, Outcome::AlreadyInjected);
}

#[test]
fn other_kinds_pass_through_byte_for_byte() {
    for input in [
        SERVICE.to_owned(),
        CONFIG_MAP.to_owned(),
        format!("{SERVICE}---\n{CONFIG_MAP}"),
        format!("---\n{CONFIG_MAP}---\n# only a comment\n"),
        String::new(),
    ] {
        let result = inject(&input);
        assert_eq!(result.text, input);
        assert!(result.reports.is_empty());
    }
}

#[test]
fn multi_document_input_injects_only_the_workloads() {
    let input = format!("{SERVICE}---\n{DEPLOYMENT}---\n{CONFIG_MAP}");
    let result = inject(&input);
    assert!(result.text.starts_with(SERVICE), "{}", result.text);
    assert!(result.text.ends_with(&format!("---\n{CONFIG_MAP}")));
    assert_eq!(
        result.reports,
        [Report {
            workload: "deployment/orders".into(),
            outcome: Outcome::Injected
        }]
    );
    let docs = parse(&result.text);
    assert_eq!(docs.len(), 3);
    assert_eq!(docs[1]["metadata"]["name"], "orders");
    assert_eq!(
        names(docs[1]["spec"]["template"]["spec"].get("initContainers")),
        ["meshlet-init", "meshlet-proxy"]
    );
}

#[test]
fn existing_init_containers_run_after_the_proxy() {
    let input = DEPLOYMENT.replace(
        "      containers:\n",
        "      initContainers:\n        - {name: migrate, image: demo:1}\n      containers:\n",
    );
    let doc = &parse(&inject(&input).text)[0];
    assert_eq!(
        names(doc["spec"]["template"]["spec"].get("initContainers")),
        ["meshlet-init", "meshlet-proxy", "migrate"]
    );
}

#[test]
fn without_native_sidecars_the_proxy_is_the_first_container() {
    let options = InjectOptions {
        native_sidecar: false,
        image: "registry.local/meshlet/sidecar:dev".into(),
        ..InjectOptions::default()
    };
    let result = inject_text("in.yaml", DEPLOYMENT, &options);
    let spec = &parse(&result.text)[0]["spec"]["template"]["spec"];
    assert_eq!(names(spec.get("initContainers")), ["meshlet-init"]);
    assert_eq!(names(spec.get("containers")), ["meshlet-proxy", "orders"]);
    let proxy = &spec["containers"][0];
    assert!(proxy.get("restartPolicy").is_none());
    assert_eq!(proxy["image"], "registry.local/meshlet/sidecar:dev");
    assert_eq!(spec["initContainers"][0]["image"], proxy["image"]);
}

#[test]
fn templates_quote_any_option_value() {
    let options = InjectOptions {
        image: "img:\"odd\" # not a comment".into(),
        control_plane: "http://cp: 1/{x}".into(),
        native_sidecar: true,
    };
    let result = inject_text("in.yaml", DEPLOYMENT, &options);
    let spec = &parse(&result.text)[0]["spec"]["template"]["spec"];
    assert_eq!(spec["initContainers"][1]["image"], options.image.as_str());
    assert_eq!(
        spec["initContainers"][1]["args"][3],
        options.control_plane.as_str()
    );
}

/// The one problem of a file with one document that cannot be injected.
fn problem(input: &str) -> InjectError {
    let result = inject(input);
    let problems: Vec<&InjectError> = result.problems().collect();
    assert_eq!(problems.len(), 1, "{:?}", result.reports);
    problems[0].clone()
}

#[test]
fn documents_that_cannot_be_injected_pass_through_with_a_warning() {
    let check = |input: String, expect: &str| {
        let result = inject(&input);
        assert_eq!(result.text, input, "passed through unchanged");
        let err = problem(&input);
        assert_eq!(err.to_string(), expect);
        assert!(!err.to_string().contains('\n'));
    };
    check(
        DEPLOYMENT.replace("          ports:\n            - containerPort: 8080\n", ""),
        "in.yaml: document 1 (Deployment orders): no container declares a containerPort and \
         there is no annotation `meshlet.dev/app-port`; the sidecar forwards inbound traffic to the app's port",
    );
    check(
        "kind: Deployment\nmetadata: {name: x}\nspec: {template: [1]}\n".into(),
        "in.yaml: document 1 (Deployment x): `spec.template` is missing or not a mapping",
    );
    check(
        DEPLOYMENT.replace("    spec:\n", "    spec:\n      initContainers: {a: b}\n"),
        "in.yaml: document 1 (Deployment orders): `template.spec.initContainers` is missing or not a list",
    );
    check(
        DEPLOYMENT.replace(
            "      labels: {app.kubernetes.io/name: orders, version: v1}\n",
            "      labels: {app.kubernetes.io/name: orders, version: v1}\n      annotations: {meshlet.dev/proxy-cpu-limit: lots}\n",
        ),
        "in.yaml: document 1 (Deployment orders): annotation `meshlet.dev/proxy-cpu-limit: lots`: \
         expected a Kubernetes quantity such as 100m, 0.5, 64Mi or 1G",
    );
    // The line is counted in the whole input, not in the document; the
    // documents around it are still injected or passed through.
    let input = format!("{CONFIG_MAP}---\nkind: [unclosed\n---\n{DEPLOYMENT}");
    let result = inject(&input);
    let err = problem(&input);
    assert_eq!(err.document, 2);
    assert!(
        matches!(err.problem, Problem::Yaml { line: Some(9), .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("in.yaml: document 2: invalid YAML at line 9: "),
        "{err}"
    );
    assert!(result
        .text
        .starts_with(&format!("{CONFIG_MAP}---\nkind: [unclosed\n---\n")));
    assert_eq!(result.reports[1].outcome, Outcome::Injected);
}

#[test]
fn one_bad_workload_does_not_stop_the_others() {
    let bad = DEPLOYMENT
        .replace("name: orders\n", "name: broken\n")
        .replace("          ports:\n            - containerPort: 8080\n", "");
    let input = format!("{bad}---\n{SERVICE}---\n{DEPLOYMENT}");
    let result = inject(&input);
    assert!(result
        .text
        .starts_with(&format!("{bad}---\n{SERVICE}---\n")));
    let outcomes: Vec<(&str, bool)> = result
        .reports
        .iter()
        .map(|r| (r.workload.as_str(), r.outcome == Outcome::Injected))
        .collect();
    assert_eq!(
        outcomes,
        [("deployment/broken", false), ("deployment/orders", true)]
    );
}

#[test]
fn the_service_name_falls_back_to_the_annotation_then_the_workload_name() {
    let unlabelled = DEPLOYMENT.replace("app.kubernetes.io/name: orders, ", "");
    let doc = &parse(&inject(&unlabelled).text)[0];
    let proxy = &doc["spec"]["template"]["spec"]["initContainers"][1];
    assert_eq!(env(proxy, "MESHLET_SERVICE")["value"], "orders");
    assert_eq!(
        doc["spec"]["template"]["spec"]["volumes"][1]["secret"]["secretName"],
        "meshlet-sidecar-orders"
    );

    let annotated = unlabelled.replace(
        "      labels: {version: v1}\n",
        "      labels: {version: v1}\n      annotations: {meshlet.dev/service: billing}\n",
    );
    let doc = &parse(&inject(&annotated).text)[0];
    let proxy = &doc["spec"]["template"]["spec"]["initContainers"][1];
    assert_eq!(
        env(proxy, "MESHLET_SERVICE")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.annotations['meshlet.dev/service']"
    );
    assert_eq!(
        doc["spec"]["template"]["spec"]["volumes"][1]["secret"]["secretName"],
        "meshlet-sidecar-billing"
    );

    // A name that is no service name: passed through, with the way out.
    let dotted = unlabelled.replace("name: orders\n", "name: orders.v2\n");
    let err = problem(&dotted);
    assert!(
        matches!(&err.problem, Problem::BadServiceName { name, .. } if name == "orders.v2"),
        "{err}"
    );
    assert!(err.to_string().contains("meshlet.dev/service"), "{err}");
}

#[test]
fn bare_pods_are_named_after_their_controller() {
    let pod = |metadata: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {metadata}\nspec:\n  containers: [{{name: a, image: i, ports: [{{containerPort: 80}}]}}]\n")
    };
    let service = |metadata: &str| -> Value {
        let doc = &parse(&inject(&pod(metadata)).text)[0];
        env(&doc["spec"]["initContainers"][1], "MESHLET_SERVICE")["value"].clone()
    };
    assert_eq!(
        service("{generateName: web-5d8f7c9b4-, labels: {pod-template-hash: 5d8f7c9b4}, ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-5d8f7c9b4, uid: u, controller: true}]}"),
        "web"
    );
    assert_eq!(
        service("{generateName: nightly-, ownerReferences: [{apiVersion: batch/v1, kind: Job, name: nightly, uid: u, controller: true}]}"),
        "nightly"
    );
    assert_eq!(service("{name: db-0}"), "db-0");
    assert_eq!(service("{generateName: loose-}"), "loose");
}

#[test]
fn inject_disabled_on_the_template_or_its_namespace() {
    let disabled = DEPLOYMENT.replace(
        "      labels: {app.kubernetes.io/name: orders, version: v1}\n",
        "      labels: {app.kubernetes.io/name: orders, version: v1}\n      annotations: {meshlet.dev/inject: disabled}\n",
    );
    let result = inject(&disabled);
    assert_eq!(result.text, disabled);
    assert_eq!(
        result.reports[0].outcome,
        Outcome::Disabled(Skipped::PodTemplate)
    );

    let namespace = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: legacy\n  annotations: {meshlet.dev/inject: disabled}\n";
    let in_legacy = DEPLOYMENT.replace("  name: orders\n", "  name: orders\n  namespace: legacy\n");
    let input = format!("{in_legacy}---\n{namespace}");
    let result = inject(&input);
    assert_eq!(result.text, input);
    assert_eq!(
        result.reports[0].outcome,
        Outcome::Disabled(Skipped::Namespace("legacy".into()))
    );
    // The template's own setting wins; other namespaces are not affected.
    let enabled = in_legacy.replace(
        "      labels: {app.kubernetes.io/name: orders, version: v1}\n",
        "      labels: {app.kubernetes.io/name: orders, version: v1}\n      annotations: {meshlet.dev/inject: enabled}\n",
    );
    let result = inject(&format!("{namespace}---\n{enabled}---\n{DEPLOYMENT}"));
    assert!(result
        .reports
        .iter()
        .all(|r| r.outcome == Outcome::Injected));
}

#[test]
fn annotations_tune_the_proxy() {
    let tuned = DEPLOYMENT.replace(
        "      labels: {app.kubernetes.io/name: orders, version: v1}\n",
        "      labels: {app.kubernetes.io/name: orders, version: v1}\n      annotations:\n        meshlet.dev/proxy-cpu-request: 200m\n        meshlet.dev/proxy-memory-limit: 256Mi\n        meshlet.dev/skip-inbound-ports: '22,9100'\n        meshlet.dev/skip-outbound-ports: '5432'\n        meshlet.dev/log-level: debug\n",
    );
    let doc = &parse(&inject(&tuned).text)[0];
    let spec = &doc["spec"]["template"]["spec"];
    let proxy = &spec["initContainers"][1];
    assert_eq!(proxy["resources"]["requests"]["cpu"], "200m");
    assert_eq!(proxy["resources"]["requests"]["memory"], "32Mi");
    assert_eq!(proxy["resources"]["limits"]["memory"], "256Mi");
    assert_eq!(env(proxy, "RUST_LOG")["value"], "debug");
    let args: Vec<&str> = spec["initContainers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args[7..],
        [
            "--exclude-inbound-ports",
            "22,9100",
            "--exclude-outbound-ports",
            "5432"
        ]
    );
    // Without annotations, neither is there.
    let plain = &parse(&inject(DEPLOYMENT).text)[0]["spec"]["template"]["spec"];
    assert_eq!(
        plain["initContainers"][0]["args"]
            .as_sequence()
            .unwrap()
            .len(),
        7
    );
    assert!(plain["initContainers"][1]["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .all(|e| e["name"] != "RUST_LOG"));

    let port = DEPLOYMENT
        .replace("          ports:\n            - containerPort: 8080\n", "")
        .replace(
            "      labels: {app.kubernetes.io/name: orders, version: v1}\n",
            "      labels: {app.kubernetes.io/name: orders, version: v1}\n      annotations: {meshlet.dev/app-port: '9090'}\n",
        );
    let doc = &parse(&inject(&port).text)[0];
    let proxy = &doc["spec"]["template"]["spec"]["initContainers"][1];
    assert_eq!(env(proxy, "MESHLET_APP_PORT")["value"], "9090");
}

#[test]
fn documents_are_numbered_as_yaml_numbers_them() {
    let numbers =
        |text: &str| -> Vec<usize> { split_documents(text).iter().map(|c| c.number).collect() };
    assert_eq!(numbers("a: 1\n---\nb: 2\n"), [1, 2]);
    assert_eq!(numbers("# header\n---\na: 1\n---\nb: 2\n"), [1, 1, 2]);
    assert_eq!(numbers("---\na: 1\n---\n"), [1, 2]);
    assert_eq!(numbers("a: |\n  ---\n  text\n"), [1]);
}

#[test]
fn the_committed_demo_manifests_are_what_inject_makes_of_their_source() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let generated = inject_text("apps.yaml", &read("apps.yaml"), &InjectOptions::default()).text;
    assert!(
        generated == read("apps.injected.yaml"),
        "manifests/examples/apps.injected.yaml is stale; regenerate it:\n  \
         meshctl inject -f manifests/examples/apps.yaml > manifests/examples/apps.injected.yaml"
    );
}

#[test]
fn empty_fields_are_filled_and_wrong_types_are_errors() {
    let empty = DEPLOYMENT.replace(
        "    metadata:\n      labels: {app.kubernetes.io/name: orders, version: v1}\n    spec:\n",
        "    metadata:\n      labels: {app.kubernetes.io/name: orders, version: v1}\n      annotations:\n    spec:\n      initContainers:\n      volumes: ~\n",
    );
    let doc = &parse(&inject(&empty).text)[0];
    let template = &doc["spec"]["template"];
    assert_eq!(
        template["metadata"]["annotations"]["meshlet.dev/injected"],
        "true"
    );
    assert_eq!(template["spec"]["volumes"][0]["name"], "meshlet-run");

    let wrong = DEPLOYMENT.replace("    spec:\n", "    spec:\n      initContainers: {a: b}\n");
    assert_eq!(
        problem(&wrong).problem,
        Problem::Shape {
            path: "template.spec.initContainers",
            expected: "a list"
        }
    );
}
