//! Issue 19, done-means 2: the control plane's mutating admission webhook
//! (`POST /inject`) on the real binary, called as the Kubernetes API server
//! calls it: TLS to the name of the webhook configuration's Service
//! (`meshlet-control-plane.meshlet.svc`, verified with the mesh CA,
//! `DATA_DIR/ca.crt`: what `caBundle` holds), no token, an
//! `AdmissionReview` v1 per fixture Pod (`fixtures/admission/`).
//!
//! For each fixture the returned JSON Patch is applied with an independent
//! applier (the `json-patch` crate) and must give exactly what `meshctl
//! inject` makes of the same Pod, which must pass `kubernetes-validate
//! --strict`; Pods left alone (already injected, opted out) get no patch,
//! as `meshctl inject` leaves them unchanged. The namespace opt-out is the
//! API server's: the webhook configuration only selects namespaces
//! labelled `meshlet.dev/inject=enabled` (checked on the manifest; the
//! webhook itself never sees the Namespace). Malformed bodies get a 400
//! with a message, oversized ones a 413.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meshlet_e2e::k8s::{root, run, validate_strict, validator};
use meshlet_e2e::process::binary;
use meshlet_e2e::{ControlPlaneProcess, TempDir};
use serde_json::{json, Value};

/// The name the API server connects to (webhook.yaml's clientConfig).
const SERVICE_NAME: &str = "meshlet-control-plane.meshlet.svc";

/// What the webhook answered.
struct Answer {
    status: u16,
    body: Value,
}

/// POSTs `body` to `/inject` over TLS as the API server would: the
/// server's certificate must be valid for [`SERVICE_NAME`] under the mesh
/// CA; no `Authorization`.
async fn post_inject(cp: &ControlPlaneProcess, body: Vec<u8>) -> Answer {
    let config = meshlet_client::client_config_from_ca_file(&cp.ca_file()).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&config));
    let tcp = tokio::net::TcpStream::connect(cp.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(SERVICE_NAME).unwrap();
    let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .expect("TLS handshake in time")
        .unwrap_or_else(|e| panic!("TLS with the mesh CA for {SERVICE_NAME}: {e}"));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = http::Request::post("/inject?timeout=10s")
        .header("host", format!("{SERVICE_NAME}:15010"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(request))
        .await
        .expect("answer in time")
        .unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {bytes:?}"));
    Answer { status, body }
}

fn yaml_to_json(yaml: &str) -> Value {
    let value: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
    serde_json::to_value(value).unwrap()
}

/// An `AdmissionReview` of the creation of `pod`, as the API server
/// writes it.
fn review(uid: &str, pod: &Value) -> Vec<u8> {
    let request = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod["metadata"]["name"].as_str().unwrap_or(""),
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    });
    serde_json::to_vec(&request).unwrap()
}

/// `meshctl inject -f -` of `yaml`: its stdout as JSON, and its stderr.
fn meshctl_inject(yaml: &str) -> (Value, String) {
    let out = run(&binary("meshctl"), &["inject", "-f", "-"], Some(yaml));
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    (
        yaml_to_json(&stdout),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The response part of an answer, checked: 200, the request's uid,
/// allowed.
fn allowed<'a>(answer: &'a Answer, uid: &str) -> &'a Value {
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer.body["kind"], "AdmissionReview");
    let response = &answer.body["response"];
    assert_eq!(response["uid"], uid);
    assert_eq!(response["allowed"], true);
    response
}

/// Applies the answer's base64 JSON Patch to `pod` with `json-patch`.
fn patched(response: &Value, pod: &Value) -> Value {
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("a patch"))
        .expect("base64");
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("a JSON Patch");
    let mut doc = pod.clone();
    json_patch::patch(&mut doc, &patch).unwrap_or_else(|e| panic!("patch applies: {e}"));
    doc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_patches_pods_exactly_as_meshctl_inject_does() {
    let dir = TempDir::new();
    let cp = ControlPlaneProcess::start(&dir.path.join("data"), &[]).await;
    let fixtures = root().join("tests/e2e/fixtures/admission");
    let read = |name: &str| std::fs::read_to_string(fixtures.join(name)).unwrap();
    let validator = validator();

    // Injected: a named Pod, a Deployment's Pod (generateName, no name,
    // annotations), a Job's Pod without an app label.
    for (fixture, service) in [
        ("pod.yaml", "orders"),
        ("deployment-pod.yaml", "frontend"),
        ("job-pod.yaml", "migrate"),
    ] {
        let yaml = read(fixture);
        let pod = yaml_to_json(&yaml);
        let uid = format!("uid-{fixture}");
        let answer = post_inject(&cp, review(&uid, &pod)).await;
        let response = allowed(&answer, &uid);
        assert!(response.get("warnings").is_none(), "{response}");
        let after = patched(response, &pod);

        let (expected, stderr) = meshctl_inject(&yaml);
        assert!(stderr.contains(" injected"), "{fixture}: {stderr}");
        assert!(
            after == expected,
            "{fixture}: the patched Pod differs from `meshctl inject`'s:\n\
             webhook: {after:#}\nmeshctl: {expected:#}"
        );
        assert_eq!(
            after["spec"]["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == "meshlet-token")
                .unwrap()["secret"]["secretName"],
            format!("meshlet-sidecar-{service}"),
            "{fixture}"
        );
        // The Pod's own containers and volumes were not rewritten: the
        // patch only adds (and its own items stay first among the app's).
        assert_eq!(after["spec"]["containers"][0], pod["spec"]["containers"][0]);
        if let Some(validator) = &validator {
            // The API server names a generateName Pod after admission;
            // kubernetes-validate wants the name it will have.
            let mut named = after.clone();
            if named["metadata"].get("name").is_none() {
                let prefix = named["metadata"]["generateName"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                named["metadata"]["name"] = json!(format!("{prefix}x7k2p"));
            }
            let yaml = serde_yaml::to_string(&named).unwrap();
            assert_eq!(validate_strict(validator, fixture, &yaml), 1);
        }
    }

    // Left alone, no patch: an injected Pod (what meshctl made of pod.yaml)
    // and a Pod that opts out; meshctl leaves both unchanged too.
    let injected = serde_yaml::to_string(&meshctl_inject(&read("pod.yaml")).0).unwrap();
    for (name, yaml, says) in [
        ("already-injected", injected, "already injected"),
        ("disabled", read("disabled-pod.yaml"), "not injected"),
    ] {
        let pod = yaml_to_json(&yaml);
        let answer = post_inject(&cp, review(name, &pod)).await;
        let response = allowed(&answer, name);
        assert!(response.get("patch").is_none(), "{name}: {response}");
        assert!(response.get("patchType").is_none(), "{name}: {response}");
        let (unchanged, stderr) = meshctl_inject(&yaml);
        assert_eq!(unchanged, pod, "{name}");
        assert!(stderr.contains(says), "{name}: {stderr}");
    }

    // A Pod that cannot be injected is still allowed, with a warning the
    // user sees in kubectl's output.
    let mut portless = yaml_to_json(&read("pod.yaml"));
    portless["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("ports");
    let answer = post_inject(&cp, review("portless", &portless)).await;
    let response = allowed(&answer, "portless");
    assert!(response.get("patch").is_none());
    let warning = response["warnings"][0].as_str().unwrap();
    assert!(
        warning.starts_with("meshlet: pod not injected: no container declares a containerPort"),
        "{warning}"
    );

    // Not a review: 400 with a message, never an empty 500.
    for (body, says) in [
        (b"{not json".to_vec(), "not an AdmissionReview"),
        (
            br#"{"apiVersion": "v1", "kind": "Pod"}"#.to_vec(),
            "expected apiVersion admission.k8s.io/v1",
        ),
        (
            br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}"#.to_vec(),
            "no request",
        ),
    ] {
        let answer = post_inject(&cp, body).await;
        assert_eq!(answer.status, 400, "{}", answer.body);
        let error = answer.body["error"].as_str().unwrap();
        assert!(error.contains(says), "{error}");
    }
    // Larger than any review of one object: 413 with a message.
    let mut huge = yaml_to_json(&read("pod.yaml"));
    huge["metadata"]["annotations"] = json!({"filler": "x".repeat(5 << 20)});
    let answer = post_inject(&cp, review("huge", &huge)).await;
    assert_eq!(answer.status, 413, "{}", answer.body);
    assert!(answer.body["error"]
        .as_str()
        .unwrap()
        .contains("AdmissionReview body over"));

    // The webhook needs no token, the rest of the API still does.
    let anonymous = cp.anonymous_client();
    let reply = cp
        .call(&anonymous, http::Method::GET, "/api/v1/services", None)
        .await;
    assert_eq!(reply.status, 401);
}

/// The webhook configuration the install step applies: the selectors that
/// make the namespace opt-in (and opt-out) the API server's job, the
/// Service whose name the certificate carries, the failure policy.
#[test]
fn the_webhook_configuration_selects_opted_in_namespaces_and_names_the_service() {
    let text = std::fs::read_to_string(root().join("manifests/base/webhook.yaml")).unwrap();
    let config = yaml_to_json(&text);
    assert_eq!(config["kind"], "MutatingWebhookConfiguration");
    let webhook = &config["webhooks"][0];
    let service = &webhook["clientConfig"]["service"];
    assert_eq!(
        format!(
            "{}.{}.svc",
            service["name"].as_str().unwrap(),
            service["namespace"].as_str().unwrap()
        ),
        SERVICE_NAME
    );
    assert_eq!(service["path"], "/inject");
    assert_eq!(service["port"], 15010);
    assert!(
        webhook["clientConfig"].get("caBundle").is_none(),
        "caBundle is filled in by examples/kind/up.sh, never committed"
    );
    let up = std::fs::read_to_string(root().join("examples/kind/up.sh")).unwrap();
    assert!(up.contains("/webhooks/0/clientConfig/caBundle"));
    assert_eq!(webhook["failurePolicy"], "Fail");
    assert_eq!(webhook["sideEffects"], "None");
    assert_eq!(webhook["admissionReviewVersions"], json!(["v1"]));
    let namespaces = webhook["namespaceSelector"]["matchExpressions"]
        .as_array()
        .unwrap();
    assert!(namespaces
        .contains(&json!({"key": "meshlet.dev/inject", "operator": "In", "values": ["enabled"]})));
    assert!(namespaces.contains(&json!({"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", "meshlet"]})));
    assert_eq!(
        webhook["rules"],
        json!([{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}])
    );
}
