//! The workload-certificate and CA routes (issue 14), thin handlers over
//! [`Workload`](crate::workload::Workload):
//!
//! - `POST /api/v1/certificates` (a sidecar token; gate `Instance`, then
//!   `Action::SignCertificate` for the token's own namespace/service):
//!   a `CertificateRequest` → `CertificateReply`. The identity comes from
//!   the token's binding, never from the CSR; admin tokens are refused (no
//!   binding, so no identity), viewers never pass the gate. 400 for a bad
//!   instance id or CSR, 413 for a CSR over `MAX_CSR_LEN`, 403 when another
//!   credential holds the instance id.
//! - `GET /api/v1/ca` (admin, viewer: `Action::ReadCa`): `CaStatus`.
//! - `POST /api/v1/ca/rotate` (admin: `Action::RotateCa`): starts a
//!   rotation (409 while one runs) and answers the new `CaStatus`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use meshlet_api::mesh::{paths, valid_instance_id, CaStatus, CertificateReply, CertificateRequest};
use tracing::Instrument;

use crate::auth::{Action, Principal, Role};
use crate::ca::MAX_CSR_LEN;
use crate::clock::now_ms;
use crate::error::{ApiFailure, StoreError};
use crate::extract::json_body;
use crate::state::AppState;

/// The body of a certificate request: the CSR and a little JSON around it.
const CERTIFICATE_BODY_LIMIT: usize = MAX_CSR_LEN + 4096;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            paths::CERTIFICATES,
            post(certificate).layer(DefaultBodyLimit::max(CERTIFICATE_BODY_LIMIT)),
        )
        .route(paths::CA, get(status))
        .route(paths::CA_ROTATE, post(rotate))
}

async fn certificate(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<CertificateReply>, ApiFailure> {
    let Role::Sidecar { namespace, service } = &principal.role else {
        return Err(ApiFailure::Forbidden(format!(
            "token {:?} ({}) may not get a workload certificate: the identity is the namespace and service a sidecar token is bound to, so only sidecar tokens get one",
            principal.name, principal.role
        )));
    };
    principal
        .may(Action::SignCertificate { namespace, service })
        .map_err(|denied| ApiFailure::Forbidden(denied.to_string()))?;
    let request: CertificateRequest = json_body(body)?;
    if !valid_instance_id(&request.instance_id) {
        return Err(ApiFailure::BadRequest(format!(
            "invalid instanceId {:?}: 1-253 characters from A-Z a-z 0-9 . _ -",
            request.instance_id
        )));
    }
    if request.csr.len() > MAX_CSR_LEN {
        return Err(ApiFailure::PayloadTooLarge(format!(
            "csr is {} bytes; at most {MAX_CSR_LEN}",
            request.csr.len()
        )));
    }
    if let Some(holder) = state.controller.owner_of(&request.instance_id) {
        if holder != principal.name {
            return Err(ApiFailure::Forbidden(format!(
                "instance {:?} is registered by another credential; token {:?} may not get its certificate",
                request.instance_id, principal.name
            )));
        }
    }
    let reply = state
        .workload
        .sign(
            &request.instance_id,
            request.csr,
            namespace,
            service,
            now_ms(),
        )
        .await?;
    Ok(Json(reply))
}

async fn status(State(state): State<AppState>) -> Json<CaStatus> {
    Json(state.workload.status(now_ms()))
}

/// Runs to completion even if the client hangs up (files and a revision).
async fn rotate(State(state): State<AppState>) -> Result<Json<CaStatus>, ApiFailure> {
    let change = async move { state.workload.rotate(&state.controller, now_ms()).await };
    tokio::spawn(change.in_current_span())
        .await
        .map_err(|e| ApiFailure::Store(StoreError::Task(e.to_string())))?
        .map(Json)
}
