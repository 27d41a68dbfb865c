//! The mutating admission webhook `POST /inject` (issue 19): the
//! Kubernetes API server sends an `AdmissionReview` v1 for every Pod
//! created in a namespace labelled `meshlet.dev/inject=enabled`
//! (`manifests/base/webhook.yaml`), and gets back a JSON Patch that adds
//! exactly what `meshctl inject` adds: both call
//! `meshlet_api::inject` (`admission::review`).
//!
//! ```text
//! API server ─TLS (mesh CA, caBundle)─► access guard (Host names; the gate is Public)
//!   ─► body ≤ admission::MAX_BODY (else 413 with a message)
//!   ─► admission::review ─► 200 AdmissionReview {uid, allowed: true, patch?, warnings?}
//!                        └► not an AdmissionReview (no uid to answer) ─► 400 {"error": ...}
//! ```
//!
//! **Who may call it:** anyone who reaches the port, without a token: the
//! API server presents no meshlet credential. It is safe because it only
//! computes: it reads the review in the body, changes no state (no store,
//! no registry, no token), answers the caller alone, and is size-limited;
//! what it answers is what `meshctl inject` prints for anyone offline. A
//! Pod it cannot inject is allowed unchanged with a warning, never refused.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use meshlet_api::inject::admission::{self, Decision};
use meshlet_api::inject::InjectOptions;
use meshlet_api::mesh::ApiError;

/// `POST /inject`, with its own body limit and the injection options.
pub fn routes<S: Clone + Send + Sync + 'static>(options: Arc<InjectOptions>) -> Router<S> {
    Router::new()
        .route(
            admission::PATH,
            post(inject).layer(DefaultBodyLimit::max(admission::MAX_BODY)),
        )
        .with_state(options)
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(ApiError { error: message })).into_response()
}

async fn inject(
    State(options): State<Arc<InjectOptions>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "AdmissionReview body over {} bytes; not reviewed",
                    admission::MAX_BODY
                ),
            )
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            )
        }
    };
    match admission::review(&body, &options) {
        Ok((review, decision)) => {
            match &decision {
                Decision::NotInjected(why) => {
                    tracing::warn!(uid = %review.response.uid, why = %why, "admission: pod not injected")
                }
                decision => {
                    tracing::info!(uid = %review.response.uid, ?decision, "admission review")
                }
            }
            Json(review).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "admission: not an AdmissionReview");
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
    }
}
