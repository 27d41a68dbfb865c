//! The admission webhook's exchange (`POST /inject`, Kubernetes'
//! `AdmissionReview` v1): a review in, a review out whose response carries
//! a base64 JSON Patch that adds to a Pod exactly what `meshctl inject`
//! adds to the same Pod ([`super::pod::inject_pod`], then
//! [`crate::json_patch::diff`] of the Pod before and after).
//!
//! ```text
//! body ─► AdmissionReview v1 with request.uid? ─no─► ReviewError (the server answers 400 with it)
//!      ─► a CREATE of a core/v1 Pod with an object? ─no─► allowed, no patch
//!      ─► inject_pod ─► Injected: allowed + JSONPatch
//!                    ─► already injected / meshlet.dev/inject: disabled: allowed, no patch
//!                    ─► a Problem (no port, bad annotation): allowed, no patch, a warning
//! ```
//!
//! The webhook never refuses a Pod: a Pod it cannot inject is created as
//! it is and the warning reaches the user through `kubectl`. Only a body
//! that is not an AdmissionReview at all gets an error (there is no
//! request uid to answer).

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::model::InjectOptions;
use super::pod::{inject_pod, pod_workload_name, PodOutcome};
use crate::json_patch;

/// The webhook's path on the control plane's HTTPS listener.
pub const PATH: &str = "/inject";
pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";
/// The largest review body accepted: the API server refuses objects over
/// about 1.5 MiB (etcd's limit) and a CREATE review holds one object.
pub const MAX_BODY: usize = 4 << 20;
/// A Kubernetes warning is kept under this many characters.
const MAX_WARNING: usize = 240;

/// What the API server sends (only the fields the webhook reads; others
/// are ignored, as the API adds fields over time).
#[derive(Debug, Clone, Deserialize)]
pub struct ReviewRequest {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub request: Option<AdmissionRequest>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    pub uid: String,
    #[serde(default)]
    pub kind: GroupVersionKind,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub operation: Option<String>,
    #[serde(default)]
    pub object: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub kind: String,
}

/// What the webhook answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReviewResponse {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub response: AdmissionResponse,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    pub uid: String,
    pub allowed: bool,
    /// `JSONPatch` when there is a patch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<String>,
    /// The JSON Patch, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// What the webhook decided, for its log line and the tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Injected { operations: usize },
    NotAPodCreate,
    AlreadyInjected,
    Disabled,
    NotInjected(String),
}

/// A body the webhook cannot answer with a review (no uid to answer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    #[error("the body is not an AdmissionReview: {0}")]
    NotJson(String),
    #[error("expected apiVersion {API_VERSION} kind {KIND}, got apiVersion {api_version:?} kind {kind:?}")]
    WrongKind { api_version: String, kind: String },
    #[error("the AdmissionReview has no request or an empty request.uid")]
    NoRequest,
}

/// Answers one review body.
pub fn review(
    body: &[u8],
    options: &InjectOptions,
) -> Result<(ReviewResponse, Decision), ReviewError> {
    let review: ReviewRequest =
        serde_json::from_slice(body).map_err(|e| ReviewError::NotJson(e.to_string()))?;
    if review.api_version != API_VERSION || review.kind != KIND {
        return Err(ReviewError::WrongKind {
            api_version: review.api_version,
            kind: review.kind,
        });
    }
    let request = review
        .request
        .filter(|r| !r.uid.is_empty())
        .ok_or(ReviewError::NoRequest)?;
    let (patch, decision) = decide(&request, options);
    let warnings = match &decision {
        Decision::NotInjected(why) => vec![shorten(format!("meshlet: pod not injected: {why}"))],
        _ => Vec::new(),
    };
    let response = AdmissionResponse {
        uid: request.uid,
        allowed: true,
        patch_type: patch.as_ref().map(|_| "JSONPatch".to_owned()),
        patch,
        warnings,
    };
    Ok((
        ReviewResponse {
            api_version: API_VERSION.to_owned(),
            kind: KIND.to_owned(),
            response,
        },
        decision,
    ))
}

/// The base64 patch (when the Pod is injected) and the decision.
fn decide(request: &AdmissionRequest, options: &InjectOptions) -> (Option<String>, Decision) {
    let is_pod = request.kind.group.is_empty() && request.kind.kind == "Pod";
    let creates = request.operation.as_deref().is_none_or(|op| op == "CREATE");
    let Some(before) = request.object.as_ref().filter(|_| is_pod && creates) else {
        return (None, Decision::NotAPodCreate);
    };
    if !before.is_object() {
        return (
            None,
            Decision::NotInjected("the object is not a Pod".into()),
        );
    }
    let mut pod: serde_yaml::Value = match serde_yaml::to_value(before) {
        Ok(pod) => pod,
        Err(e) => return (None, Decision::NotInjected(e.to_string())),
    };
    let name = pod_workload_name(&pod);
    match inject_pod(&mut pod, name.as_deref(), None, options) {
        Ok(PodOutcome::Injected) => {}
        Ok(PodOutcome::AlreadyInjected) => return (None, Decision::AlreadyInjected),
        Ok(PodOutcome::Disabled(_)) => return (None, Decision::Disabled),
        Err(problem) => return (None, Decision::NotInjected(problem.to_string())),
    }
    let after: Value = match serde_json::to_value(&pod) {
        Ok(after) => after,
        Err(e) => return (None, Decision::NotInjected(e.to_string())),
    };
    let operations = json_patch::diff(before, &after);
    let patch = serde_json::to_vec(&operations).unwrap_or_default();
    (
        Some(base64::engine::general_purpose::STANDARD.encode(patch)),
        Decision::Injected {
            operations: operations.len(),
        },
    )
}

fn shorten(mut text: String) -> String {
    if text.chars().count() > MAX_WARNING {
        text = text.chars().take(MAX_WARNING - 1).collect();
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn body(request: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"apiVersion": API_VERSION, "kind": KIND, "request": request}))
            .unwrap()
    }

    fn pod_request(object: Value) -> Value {
        json!({"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
               "operation": "CREATE", "namespace": "default", "object": object})
    }

    fn pod() -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"generateName": "orders-5d8f7c9b4-", "labels": {"app": "orders", "pod-template-hash": "5d8f7c9b4"}},
               "spec": {"containers": [{"name": "orders", "image": "demo:1", "ports": [{"containerPort": 8080}]}]}})
    }

    #[test]
    fn a_pod_gets_a_patch_and_the_uid_back() {
        let (out, decision) = review(&body(pod_request(pod())), &InjectOptions::default()).unwrap();
        assert!(matches!(decision, Decision::Injected { operations } if operations > 3));
        assert_eq!(out.api_version, API_VERSION);
        assert_eq!(out.response.uid, "u-1");
        assert!(out.response.allowed);
        assert_eq!(out.response.patch_type.as_deref(), Some("JSONPatch"));
        let patch = base64::engine::general_purpose::STANDARD
            .decode(out.response.patch.unwrap())
            .unwrap();
        let ops: Vec<json_patch::PatchOp> = serde_json::from_slice(&patch).unwrap();
        // The pod's own container is not rewritten.
        assert!(ops.iter().all(|op| !matches!(op,
            json_patch::PatchOp::Replace { path, .. } | json_patch::PatchOp::Remove { path }
                if path.starts_with("/spec/containers"))));
    }

    #[test]
    fn left_alone_without_a_patch() {
        let options = InjectOptions::default();
        let service = json!({"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Service"},
                             "operation": "CREATE", "object": {"kind": "Service"}});
        let mut disabled = pod();
        disabled["metadata"]["annotations"] = json!({"meshlet.dev/inject": "disabled"});
        let mut no_port = pod();
        no_port["spec"]["containers"][0]
            .as_object_mut()
            .unwrap()
            .remove("ports");
        let mut update = pod_request(pod());
        update["operation"] = json!("UPDATE");
        for (request, expect) in [
            (service, Decision::NotAPodCreate),
            (update, Decision::NotAPodCreate),
            (pod_request(disabled), Decision::Disabled),
        ] {
            let (out, decision) = review(&body(request), &options).unwrap();
            assert_eq!(decision, expect);
            assert!(out.response.allowed && out.response.patch.is_none());
            assert!(out.response.warnings.is_empty());
        }
        let (out, decision) = review(&body(pod_request(no_port)), &options).unwrap();
        assert!(matches!(decision, Decision::NotInjected(_)));
        assert!(out.response.allowed && out.response.patch.is_none());
        assert!(
            out.response.warnings[0].contains("containerPort"),
            "{:?}",
            out.response.warnings
        );
    }

    #[test]
    fn bodies_that_are_no_review_are_errors() {
        let options = InjectOptions::default();
        assert!(matches!(
            review(b"{not json", &options),
            Err(ReviewError::NotJson(_))
        ));
        assert!(matches!(
            review(br#"{"apiVersion": "v1", "kind": "Pod"}"#, &options),
            Err(ReviewError::WrongKind { .. })
        ));
        assert_eq!(
            review(&body(json!({"uid": ""})), &options).unwrap_err(),
            ReviewError::NoRequest
        );
    }
}
